"""Hydra's side of the config: the schema registered in the ConfigStore, the resolvers (``mt.*``), run naming,
composition (:func:`compose`) and the conversion of a composed config into a checked :class:`JobConfig`
(:func:`to_job_config`).

Hydra merges ``conf/config.yaml`` and the chosen group files onto :class:`JobConfig`, so an unknown key or a
value of the wrong type fails before anything starts; :func:`moetrain.config.checks.validate_job` then checks
values and raises :class:`ConfigError` naming the override to change.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import fields, is_dataclass
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moetrain.config.checks import validate_job
from moetrain.config.schema import JobConfig
from moetrain.model.config import ConfigError


def world_size() -> int:
    """The job's world size as the launcher set it (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@functools.lru_cache(maxsize=None)
def _job_id() -> str:
    """One id per job, equal on every rank: Slurm's job id, torchrun's run id, else a timestamp (one process)."""
    for var in ("MOETRAIN_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return value
    return time.strftime("%Y%m%d-%H%M%S")


# Overrides that continue or observe a run rather than define another: a resume with more steps, a profile of
# some steps or another checkpoint interval keeps its run.dir.
_NOT_IDENTITY = ("run.", "checkpoint.resume", "checkpoint.interval", "checkpoint.keep_last", "checkpoint.async_save",
                 "checkpoint.allow_data_change", "train.steps", "train.stop_at", "train.profile", "train.val_",
                 "train.max_nonfinite_steps", "data.prefetch", "logging.", "hydra.", "plan")


def _run_name() -> str:
    """``MOETRAIN_RUN_ID``, else ``default`` for a plain ``moetrain train``, else a readable prefix of the command's
    overrides and a hash of them all (``-<task id>`` in a Slurm job array): every rank and every relaunch of the
    same command agree. Only ``[A-Za-z0-9_.-]``, so the name can be passed back in an override."""
    if os.environ.get("MOETRAIN_RUN_ID"):
        return os.environ["MOETRAIN_RUN_ID"]
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    name = overrides_name(overrides) or "default"
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{name}-{array_task}" if array_task else name


def overrides_name(overrides: list[str]) -> str:
    """A readable, path- and override-safe name for the overrides that define a run ("" for none)."""
    import hashlib
    import re

    defining = sorted(o for o in overrides if not o.lstrip("+~").startswith(_NOT_IDENTITY))
    if not defining:
        return ""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(o.replace("=", "-") for o in defining))[:48].strip("_")
    return f"{slug}-{hashlib.sha1(chr(0).join(defining).encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    for name, fn in (("mt.job_id", _job_id), ("mt.run_name", _run_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "mt.job_id")


def register_configs() -> None:
    """Register the schema so that conf/config.yaml's defaults list starts from it (``- job_schema``)."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)


def to_job_config(cfg: DictConfig | dict[str, Any], world_size_: int | None = None) -> JobConfig:
    """Resolve and check a composed config for ``world_size_`` ranks (default: the launcher's); errors name the
    key."""
    register_resolvers()
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    _reject_unknown_keys(cfg, JobConfig, "")
    cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
    OmegaConf.resolve(cfg)
    job: JobConfig = OmegaConf.to_object(cfg)
    return validate_job(job, world_size() if world_size_ is None else world_size_)


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's ``+key=value`` opens a typed node for new keys; no key outside the schema is accepted."""
    hints = get_type_hints(schema)
    names = {f.name for f in fields(schema)}
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(full, f"unknown key; {prefix.rstrip('.') or 'the root'} has {sorted(names)}")
        sub = hints[key]
        if is_dataclass(sub) and isinstance(node._get_node(key), DictConfig):
            _reject_unknown_keys(node[key], sub, full + ".")


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with overrides, as ``moetrain train`` does (for tests and tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from moetrain.resources import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))
