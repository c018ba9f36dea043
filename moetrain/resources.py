"""Files that ship with moetrain."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config tree: ``moetrain.conf`` in a wheel, the checkout's ``conf/`` in an editable install.

    NOTE: setuptools' editable finder does not follow the ``moetrain.conf -> conf`` package-dir mapping.
    """
    try:
        return Path(str(resources.files("moetrain.conf")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "conf"
