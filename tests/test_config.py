"""Hydra composition against the schema: every shipped YAML composes, bad configs fail naming the key."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from moetrain.config import compose, to_job_config
from moetrain.model import ConfigError
from moetrain.resources import conf_dir


def _group_options():
    for group_dir in sorted(p for p in conf_dir().iterdir() if p.is_dir() and not p.name.startswith("_")):
        for yaml in sorted(group_dir.glob("*.yaml")):
            yield f"{group_dir.name}={yaml.stem}"


# Presets for a given number of ranks: (world size, what they are for).
_SIZED = {"parallel=node8": (8, ["model=proxy", "data=synthetic", "train.global_batch_size=64",
                                 "train.micro_batch_size=1"]),
          "parallel=deepseek_v3_2048": (2048, ["model=deepseek_v3_671b", "experiment=deepseek_v3"]),
          "plan=deepseek_v3_report": (2048, ["model=deepseek_v3_671b"])}


@pytest.mark.parametrize("option", list(_group_options()))
def test_every_shipped_yaml_composes_and_validates(option, monkeypatch):
    overrides = [option]
    if option in _SIZED:
        world, more = _SIZED[option]
        monkeypatch.setenv("WORLD_SIZE", str(world))
        overrides += more
    if option == "experiment=deepseek_v3":
        overrides.append("model=deepseek_v3_671b")
    if option.startswith("model=") and option != "model=tiny":
        overrides.append("data=synthetic")  # the demo data needs the byte vocabulary of model=tiny
    if option == "data=shards":
        overrides.append("data.paths=[/data/a,/data/b]")
    if option == "train=v3":
        overrides.append("model=deepseek_v3_671b")
    job = to_job_config(compose(overrides))
    group, name = option.split("=")
    if group == "experiment":  # the V3 recipe over the groups: train/v3 and optim/v3
        assert (job.train.batch_ramp_start, job.optim.schedule, job.train.recompute) == (3072, "v3", "full")
    else:
        assert getattr(job, group) is not None


def _error(overrides) -> Exception:
    with pytest.raises((ConfigError, ConfigCompositionException, OmegaConfBaseException, ValueError)) as e:
        to_job_config(compose(overrides))
    return e.value


@pytest.mark.parametrize("overrides,key", [
    (["optim.lr=-1"], "optim.lr"),
    (["train.global_batch_size=20", "train.micro_batch_size=8"], "train.global_batch_size"),
    (["train.seq_len=100000"], "train.seq_len"),
    (["model.moe.router.topk_group=9"], "model.moe.router.topk_group"),
    (["train.recompute=some"], "train.recompute"),
])
def test_bad_values_name_the_key(overrides, key):
    assert key in str(_error(overrides))


def test_unknown_key_is_named():
    assert "not_a_key" in str(_error(["+train.not_a_key=1"]))
    assert "lrr" in str(_error(["optim.lrr=1"]))


def test_unknown_preset_is_named():
    msg = str(_error(["model=no_such_model"]))
    assert "model" in msg and "no_such_model" in msg


def test_derived_grad_accum_and_run_dir_interpolation():
    job = to_job_config(compose(["train.global_batch_size=32", "train.micro_batch_size=4", "run.dir=/tmp/x"]))
    assert job.train.grad_accum_steps == 8
    assert job.checkpoint.dir == "/tmp/x/checkpoints"


def test_cli_fails_fast_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moetrain", "train", "optim.lr=-0.5", f"run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "optim.lr" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
