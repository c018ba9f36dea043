"""Model presets: the YAML files of the Hydra group ``conf/model/``, read into :class:`ModelConfig`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from moetrain.model.config import ModelConfig


def conf_dir():
    """The shipped Hydra config tree: ``moetrain.conf`` in a wheel, the checkout's ``conf/`` in an editable install.

    NOTE: setuptools' editable finder does not follow the ``moetrain.conf -> conf`` package-dir mapping.
    """
    try:
        return resources.files("moetrain.conf")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "conf"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (conf_dir() / "model").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> ModelConfig:
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model={name}: unknown model preset; choose one of {preset_names()}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(path.read_text()))
    cfg: ModelConfig = OmegaConf.to_object(merged)
    return cfg.validate(prefix="model")
