"""What a user can act on: the errors that end a run with one line and an exit status instead of a traceback
(``moetrain train``, ``moetrain plan``): 2 = refused before training (config, a busy run.dir), 1 = stopped by an
error while running. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite for train.max_nonfinite_steps steps."""


def _kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(refusals, run errors); imported here so that a caller pays for the modules only once an error happened."""
    from moetrain.checkpoint import CheckpointError
    from moetrain.data.indexed import ShardError
    from moetrain.hf import HFFormatError
    from moetrain.model import ConfigError
    from moetrain.run_dir import RunDirLocked

    return (ConfigError, RunDirLocked), (CheckpointError, HFFormatError, ShardError, TrainingDiverged)


def user_error(e: BaseException, composing: bool) -> tuple[int | None, str]:
    """(exit status, one-line message) of an error the user can act on, or (None, '') for a bug.

    ``composing``: raised while the config was composed and checked, where Hydra's and OmegaConf's errors mean a
    bad override or preset; later they are bugs and keep their traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    refusals, run_errors = _kinds()
    for cause in _causes(e):
        if isinstance(cause, refusals):
            return 2, _one_line(str(cause))
        if isinstance(cause, run_errors):
            return 1, _one_line(str(cause))
    if composing and isinstance(e, (HydraException, OmegaConfBaseException)):
        text = str(e).split("Config search path:")[0].replace(":\n", ": ")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
        cause = e.__cause__
        detail = [ln.strip() for ln in str(cause).splitlines() if ln.strip()][:1] if cause else []
        text = "; ".join(ln for ln in lines + detail if not ln.startswith(("full_key:", "object_type", "reference_type")))
        return 2, _one_line(f"{key}: {text}" if key else text)
    return None, ""


def _causes(e: BaseException):
    """``e`` and what it was raised from; the context of a wrapper too (OmegaConf wraps resolver errors), but not
    of any other error, which may be a bug raised while handling a user error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    while e is not None:
        yield e
        wrapper = isinstance(e, (HydraException, OmegaConfBaseException)) and not e.__suppress_context__
        e = e.__cause__ or (e.__context__ if wrapper else None)


def _one_line(text: str) -> str:
    return " ".join(text.split())
