"""Model presets: the YAML files of the Hydra group ``conf/model/``, read into :class:`ModelConfig`."""

from __future__ import annotations

from omegaconf import OmegaConf

from moetrain.model.config import ModelConfig
from moetrain.resources import conf_dir


def preset_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model={name}: unknown model preset; choose one of {preset_names()}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(path.read_text()))
    cfg: ModelConfig = OmegaConf.to_object(merged)
    return cfg.validate(prefix="model")
