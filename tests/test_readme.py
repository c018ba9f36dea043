"""Every command README.md shows in a ```bash block is exercised by a test, and a new one without a test fails here.

``HOW`` says, for each command line (``\\`` continuations joined, a trailing ``# comment`` cut), how:

- ``run``: the named test in this file runs the line in bash, in a temporary directory, with ``moetrain`` on PATH.
  Placeholders (``corpus/*.jsonl``, ``/data/web``, ``path/to/hf-dir``...) are replaced (``subs``) by files the test
  makes, and ``extra`` overrides are appended that only shorten the run (fewer steps, smaller batches: CI has 2
  cores and little time), never change what the command does. The launch scripts (``launch/torchrun.sh``,
  ``sbatch launch/slurm.sbatch`` under a faked Slurm) run with a recording ``torchrun`` in place of the real one.
- ``world_size``: the config is composed through Hydra from the line's own overrides and checked by
  :func:`moetrain.config.to_job_config`, what ``moetrain train`` runs before anything starts, for the number of
  ranks the command implies (GPU-sized commands, and CPU ones that would train for minutes).
- ``elsewhere``: a named test in another file already runs it (checked to exist).
"""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import pytest
import torch
import yaml

from conftest import metrics_records
from test_launch import SMALL, _fake_slurm

ROOT = Path(__file__).resolve().parents[1]
SHORT = f"train.steps=2 {' '.join(SMALL)}"  # a few seconds of the tiny model instead of minutes


@dataclass(frozen=True)
class How:
    why: str
    run: str | None = None  # the test here that runs the line
    subs: tuple[tuple[str, str], ...] = ()  # (README text, what stands in for it)
    extra: str = ""  # appended overrides that only shorten the run
    world_size: int | None = None  # composed and validated for this many ranks
    elsewhere: str | None = None  # "tests/test_x.py::test_name" that runs it


PROXY_BATCH = "data=synthetic train.global_batch_size=256 train.micro_batch_size=8"

HOW = {
    'pip install torch==2.13.0 && pip install -e ".[dev]"': How(
        "CI installs by it in a fresh virtual environment (.ci/run)", run="test_ci_installs_and_tests_as_printed"),
    "moetrain plan model=proxy parallel=node8 data=synthetic train.seq_len=4096 train.global_batch_size=64 "
    "train.micro_batch_size=1": How("plans the proxy on one node, which fits", run="test_plan_and_report_as_printed"),
    "moetrain plan model=deepseek_v3_671b plan=deepseek_v3_report": How(
        "the V3 report's figures in the table", run="test_plan_and_report_as_printed"),
    "moetrain plan model=deepseek_v3_671b plan=deepseek_v3_report --json": How(
        "the V3 report's figures as JSON", elsewhere="tests/test_plan.py::test_plan_reproduces_the_deepseek_v3_report"),
    "moetrain report runs/default": How("a test-made run in runs/default", run="test_plan_and_report_as_printed"),
    "moetrain report runs/lr1e-3 runs/lr2e-3 --out lr.png": How(
        "two test-made runs", run="test_plan_and_report_as_printed"),
    "moetrain train": How(
        "the 300-step demo: test_demo_end_to_end runs it; validated here", world_size=1,
        elsewhere="tests/test_train.py::test_demo_end_to_end"),
    "python -m pytest -q -n auto tests": How("CI itself (.ci/run)", run="test_ci_installs_and_tests_as_printed"),
    "moetrain train train.steps=1000 optim.lr=1e-3 run.dir=runs/lr1e-3": How(
        "1000 demo steps: composed and validated", world_size=1),
    "moetrain train model=proxy_1gpu data=synthetic train.seq_len=4096 train.global_batch_size=16 "
    "train.micro_batch_size=2": How(
        "the one-GPU proxy: composed and validated; that it fits one H100 is test_plan's",
        world_size=1, elsewhere="tests/test_plan.py::test_single_gpu_preset_fits_one_h100_with_fp32_master_weights_and_adam"),
    "torchrun --nproc-per-node 8 -m moetrain train model=proxy data=synthetic train.global_batch_size=64 "
    "train.micro_batch_size=8 parallel.ep=8": How("8 GPUs: composed and validated for 8 ranks", world_size=8),
    "moetrain train --cfg job": How("prints the config", run="test_print_config_as_printed"),
    "moetrain train -m optim.lr=1e-3,2e-3 train.steps=100": How(
        "each job validated; the sweep itself (2 steps) runs in test_launch", world_size=1,
        elsewhere="tests/test_launch.py::test_sweep_jobs_train_in_their_own_run_dirs"),
    'eval "$(moetrain completion bash)"': How(
        "in bash; what it completes is tested in test_launch", run="test_completion_as_printed",
        elsewhere="tests/test_launch.py::test_bash_completion_completes_subcommands_and_overrides"),
    "torchrun --standalone --nproc-per-node 2 -m moetrain train parallel.ep=2 train.micro_batch_size=8 "
    "train.steps=20 run.dir=runs/ep2": How("2 CPU processes, 2 of its 20 steps", run="test_cpu_layouts_as_printed",
                                          extra="train.steps=2"),
    "torchrun --standalone --nproc-per-node 2 -m moetrain train parallel.pp=2 parallel.pp_schedule=DualPipeV "
    "train.micro_batch_size=4 train.steps=20 run.dir=runs/pp2": How(
        "2 CPU processes, 2 of its 20 steps", run="test_cpu_layouts_as_printed", extra="train.steps=2"),
    "moetrain train precision=fp8 precision.fp8.provider=native train.steps=50 run.dir=runs/fp8": How(
        "2 of its 50 steps; 200 steps against fp32 in test_precision", run="test_native_fp8_as_printed",
        extra="train.steps=2", elsewhere="tests/test_precision.py::test_native_fp8_training_tracks_fp32"),
    "moetrain prepare-data corpus/*.jsonl --output /data/web --tokenizer path/to/hf-tokenizer-dir --workers 16": How(
        "two jsonl files and a WordLevel tokenizer made here; 2 workers on CI's 2 cores",
        run="test_own_data_as_printed",
        subs=(("/data/web", "web"), ("path/to/hf-tokenizer-dir", "tok"), ("--workers 16", "--workers 2"))),
    "moetrain train data=shards 'data.paths=[/data/web,/data/code]' 'data.weights=[0.7,0.3]'": How(
        "the prepared web data and a second dataset of the same tokenizer", run="test_own_data_as_printed",
        subs=(("/data/web", "web"), ("/data/code", "code")), extra=SHORT),
    "moetrain train checkpoint.interval=500 checkpoint.keep_last=3": How(
        "the 300-step demo with other checkpoint keys: validated", world_size=1),
    "moetrain train run.dir=runs/my-run": How(
        "the run the conversions below read; resuming is test_launch's", run="test_checkpoint_commands_as_printed",
        extra=SHORT, elsewhere="tests/test_launch.py::test_the_same_command_continues_in_the_same_default_run_dir"),
    "moetrain train train.stop_at=1000": How(
        "validated; stopping and continuing exactly in test_checkpoint", world_size=1,
        elsewhere="tests/test_checkpoint.py::test_resume_is_bit_exact"),
    "moetrain convert --to-hf runs/my-run/checkpoints hf-out": How(
        "from the run above; the same logits in transformers in test_hf_convert",
        run="test_checkpoint_commands_as_printed",
        elsewhere="tests/test_hf_convert.py::test_export_trained_model_gives_same_logits_in_transformers"),
    "moetrain convert --from-hf path/to/DeepSeek-V3 ckpt-out": How(
        "the export above stands in for the release; its FP8 layout in test_hf_convert",
        run="test_checkpoint_commands_as_printed", subs=(("path/to/DeepSeek-V3", "hf-out"),),
        elsewhere="tests/test_hf_convert.py::test_fp8_release_layout_dequantises_to_bf16"),
    "moetrain train checkpoint.init_from_hf=path/to/hf-dir model=...": How(
        "from the export above, of model=tiny", run="test_checkpoint_commands_as_printed",
        subs=(("path/to/hf-dir", "hf-out"), ("model=...", "model=tiny")), extra=SHORT),
    "bash launch/torchrun.sh model=proxy data=synthetic train.global_batch_size=64 train.micro_batch_size=8": How(
        "the script with a recording torchrun; validated for a node of 8 GPUs", run="test_launch_scripts_as_printed",
        world_size=8),
    "sbatch --nodes=4 launch/slurm.sbatch model=proxy ...": How(
        "the batch script under a faked Slurm (4 nodes of 8 GPUs) with a recording torchrun; '...' must give a "
        "batch 32 ranks divide: validated for 32 ranks", run="test_launch_scripts_as_printed",
        subs=(("sbatch --nodes=4 ", "SLURM_NNODES=4 bash "), ("...", PROXY_BATCH)), world_size=32),
    "docker build -f docker/Dockerfile -t moetrain . && docker run --gpus all moetrain bash docker/smoke.sh": How(
        "no docker in CI: the image's requirements and hadolint; smoke.sh passes shellcheck",
        elsewhere="tests/test_launch.py::test_docker_image_keeps_its_torch_and_passes_hadolint"),
}


def readme_commands() -> list[str]:
    """The command lines of README.md's ```bash blocks, in order, each once."""
    commands, fence, pending = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "bash":
            continue
        line = pending + re.sub(r"\s+#\s.*$", "", line).strip()  # a comment starts with "# " after a blank
        pending = line[:-1].rstrip() + " " if line.endswith("\\") else ""
        if line and not pending:
            commands.append(line)
    return list(dict.fromkeys(commands))


def test_every_readme_command_has_a_test():
    commands = readme_commands()
    untested = [c for c in commands if c not in HOW]
    assert not untested, "README commands no test runs; add each to HOW in tests/test_readme.py:\n" + \
        "\n".join(untested)
    stale = [c for c in HOW if c not in commands]
    assert not stale, "HOW entries for commands README.md no longer shows:\n" + "\n".join(stale)


@pytest.mark.parametrize("line", HOW)
def test_each_entry_names_what_exercises_it(line):
    how = HOW[line]
    assert how.run or how.world_size or how.elsewhere, line
    assert how.run is None or callable(globals().get(how.run)), how.run
    if how.elsewhere:
        file, name = how.elsewhere.split("::")
        tree = ast.parse((ROOT / file).read_text())
        assert name in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, how.elsewhere
    for old, _ in how.subs:
        assert old in line, (line, old)
    for word in shlex.split(_stand_ins(line)):  # the repository's files it names exist
        if re.fullmatch(r"(launch|docker|conf|benchmarks)/[\w./-]+", word):
            assert (ROOT / word).exists(), word


def _stand_ins(line: str) -> str:
    for old, new in HOW[line].subs:
        line = line.replace(old, new)
    return line


# --------------------------------------------------------------------------------------- composed, validated
def _jobs(line: str) -> list[list[str]]:
    """The overrides of each job the line starts: the words after ``train`` or the launch script; ``-m`` sweeps."""
    words = shlex.split(_stand_ins(line))
    start = next(i for i, w in enumerate(words) if w == "train" or w.endswith((".sh", ".sbatch")))
    overrides = words[start + 1:]
    if "-m" not in overrides:
        return [overrides]
    choices = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in overrides if o != "-m"]
    return [list(job) for job in product(*choices)]


@pytest.mark.parametrize("line", [line for line, how in HOW.items() if how.world_size])
def test_command_composes_and_validates_for_its_world_size(line, tmp_path, monkeypatch):
    from moetrain.config import compose, to_job_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", str(HOW[line].world_size))
    for overrides in _jobs(line):
        job = to_job_config(compose(overrides))  # raises ConfigError naming the key where the layout cannot work
        dp = job.parallel.data_parallel_size(HOW[line].world_size)
        assert job.train.grad_accum_steps * job.train.micro_batch_size * dp == job.train.global_batch_size


# ----------------------------------------------------------------------------------------------- run in bash
@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """Runs a README line in bash with ``moetrain`` (this checkout's) and this Python's torchrun on PATH."""
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "moetrain").write_text(f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} -m moetrain "$@"\n')
    (bin_dir / "moetrain").chmod(0o755)

    def run(cwd, line, env=None, after=""):
        """``env``: instead of this process's (its PATH's torchrun first: a stand-in's)."""
        command = f"{_stand_ins(line)} {HOW[line].extra}".strip() + after
        path = f"{bin_dir}:{env['PATH']}" if env else f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=300,
                              env={**(env or os.environ), "PATH": path})
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    return run


def _line(test: str, *words: str) -> str:
    """The README line run by ``test`` that contains each of ``words``."""
    (line,) = [line for line, how in HOW.items() if how.run == test and all(w in line for w in words)]
    return line


def test_ci_installs_and_tests_as_printed():
    """.ci/run runs each README install and test command (``-q`` and pytest's options added)."""
    ci = [shlex.split(step, comments=True) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if not line.lstrip().startswith("#") for step in line.split("&&")]
    for line in (line for line, how in HOW.items() if how.run == "test_ci_installs_and_tests_as_printed"):
        for step in line.split("&&"):
            words = shlex.split(step, comments=True)
            assert any(_in_order(words, [w for w in c if w != "quiet"]) for c in ci), step


def _in_order(words: list[str], within: list[str]) -> bool:
    it = iter(within)
    return all(w in it for w in words)


def test_print_config_as_printed(shell, tmp_path):
    from omegaconf import OmegaConf

    from moetrain.config import compose

    printed = shell(tmp_path, "moetrain train --cfg job").stdout
    assert yaml.safe_load(printed) == yaml.safe_load(OmegaConf.to_yaml(compose([])))
    assert not list(tmp_path.iterdir())  # printing trains nothing and writes nothing


def test_completion_as_printed(shell, tmp_path):
    proc = shell(tmp_path, 'eval "$(moetrain completion bash)"', after="\ncomplete -p moetrain")
    assert "-F _moetrain_complete" in proc.stdout and proc.stdout.rstrip().endswith(" moetrain")


def test_cpu_layouts_as_printed(shell, tmp_path):
    """ep=2 and pp=2 (DualPipeV) train the same global batches: the same numbers, as one process would."""
    from layouts import assert_close_records

    for name, words in (("ep2", ("parallel.ep=2",)), ("pp2", ("DualPipeV",))):
        shell(tmp_path, _line("test_cpu_layouts_as_printed", *words))
        ckpt = tmp_path / "runs" / name / "checkpoints" / "step_00000002"
        assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], name
    assert "(ep 2)" in (tmp_path / "runs" / "ep2" / "train.log").read_text()
    assert "2 pipeline ranks (DualPipeV" in (tmp_path / "runs" / "pp2" / "train.log").read_text()
    assert_close_records(metrics_records(tmp_path / "runs" / "pp2"), metrics_records(tmp_path / "runs" / "ep2"))


def test_native_fp8_as_printed(shell, tmp_path):
    shell(tmp_path, _line("test_native_fp8_as_printed"))
    assert metrics_records(tmp_path / "runs" / "fp8")[-1]["step"] == 2
    assert "compute fp8 (native, blockwise" in (tmp_path / "runs" / "fp8" / "train.log").read_text()


def test_own_data_as_printed(shell, tmp_path):
    from test_bad_input_data import _jsonl, _texts, _word_tokenizer

    from moetrain.data.dataset import TokenDataset
    from moetrain.data.prepare import prepare_documents

    words = ["doc", ":", "alpha", "beta", "gamma", "delta", "expert", "router", "latent", "token", "shard"]
    tok = _word_tokenizer(tmp_path / "tok", words)
    (tmp_path / "corpus").mkdir()
    _jsonl(tmp_path / "corpus" / "a.jsonl", _texts(150, seed=0))
    _jsonl(tmp_path / "corpus" / "b.jsonl", _texts(150, seed=1))
    prepare_documents(_texts(200, seed=2, tag="code"), tmp_path / "code", str(tok), progress=False)
    shell(tmp_path, _line("test_own_data_as_printed", "prepare-data"))
    web = TokenDataset(str(tmp_path / "web"))
    assert sum(s.documents for s in web.manifest.shards) == 300  # both files of the glob
    assert web.manifest.tokenizer_fingerprint == TokenDataset(str(tmp_path / "code")).manifest.tokenizer_fingerprint
    shell(tmp_path, _line("test_own_data_as_printed", "data=shards"))
    (run,) = (tmp_path / "runs").iterdir()
    assert metrics_records(run)[-1]["step"] == 2
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert data["paths"] == ["web", "code"] and data["weights"] == [0.7, 0.3]


def test_checkpoint_commands_as_printed(shell, tmp_path):
    from moetrain.checkpoint.convert import load_checkpoint_model
    from moetrain.checkpoint.manager import resolve_checkpoint

    test = "test_checkpoint_commands_as_printed"
    shell(tmp_path, _line(test, "train run.dir=runs/my-run"))
    assert (tmp_path / "runs" / "my-run" / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    shell(tmp_path, _line(test, "--to-hf"))
    assert json.loads((tmp_path / "hf-out" / "config.json").read_text())["model_type"] == "deepseek_v3"
    shell(tmp_path, _line(test, "--from-hf"))
    trained = load_checkpoint_model(resolve_checkpoint(tmp_path / "runs" / "my-run" / "checkpoints")).state_dict()
    imported = load_checkpoint_model(resolve_checkpoint(tmp_path / "ckpt-out")).state_dict()
    assert trained.keys() == imported.keys()
    for k, v in trained.items():  # the run's weights came back through the HF format
        assert torch.equal(imported[k].to(v.dtype), v), k
    shell(tmp_path, _line(test, "init_from_hf"))
    (log,) = [p for p in (tmp_path / "runs").glob("*/train.log") if p.parent.name != "my-run"]
    assert "initialised from Hugging Face weights in hf-out" in log.read_text()


def test_launch_scripts_as_printed(shell, tmp_path):
    """launch/torchrun.sh and launch/slurm.sbatch (4 nodes of 8 GPUs) hand the overrides to torchrun as given."""
    env = _fake_slurm(tmp_path)
    (tmp_path / "fakebin" / "torchrun").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = --help ]; then echo "--signals-to-handle --shutdown-timeout"; exit 0; fi\n'
        'printf "%s\\n" "$@" > "$FAKE_TORCHRUN_ARGS"\n')
    (tmp_path / "fakebin" / "torchrun").chmod(0o755)
    env.update(SLURM_GPUS_ON_NODE="8", FAKE_TORCHRUN_ARGS=str(tmp_path / "torchrun.args"))
    for line in (line for line, how in HOW.items() if how.run == "test_launch_scripts_as_printed"):
        shell(ROOT, line, env=env)
        args = (tmp_path / "torchrun.args").read_text().splitlines()
        (overrides,) = _jobs(line)
        assert args[-len(overrides) - 3:] == ["-m", "moetrain", "train", *overrides], args
        if "sbatch" in line:
            assert args[args.index("--nnodes") + 1] == "4" and args[args.index("--nproc-per-node") + 1] == "8"
        else:  # every GPU of the node: none here
            assert args[args.index("--nproc-per-node") + 1] == str(torch.cuda.device_count() or 1)


def test_plan_and_report_as_printed(shell, tmp_path):
    table = shell(tmp_path, _line("test_plan_and_report_as_printed", "plan", "proxy")).stdout
    assert "(fits)" in table and "8 x H100" in table
    table = shell(tmp_path, _line("test_plan_and_report_as_printed", "plan", "deepseek_v3")).stdout
    assert "671.0B total" in table and "11.6B MTP" in table and "= $5.576M" in table and "(fits)" in table
    # A small run in each run dir the lines name: one trained here, copied to the others (report reads run dirs).
    subprocess.run([sys.executable, "-m", "moetrain", "train", "run.dir=runs/default", "train.steps=3",
                    "logging.interval=1", *SMALL], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    for name in ("lr1e-3", "lr2e-3"):
        shutil.copytree(tmp_path / "runs" / "default", tmp_path / "runs" / name)
    shell(tmp_path, _line("test_plan_and_report_as_printed", "report", "default"))
    assert (tmp_path / "runs" / "default" / "report.png").stat().st_size and \
        (tmp_path / "runs" / "default" / "report.html").exists()
    shell(tmp_path, _line("test_plan_and_report_as_printed", "--out"))
    assert (tmp_path / "lr.png").stat().st_size
