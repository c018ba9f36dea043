"""The trainer: reproducibility, gradient accumulation, recomputation, schedules, and the demo end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import make_model, small_config
from moetrain.config import OptimConfig, TrainConfig, compose, to_job_config
from moetrain.model import collect_expert_counts, pop_balance_loss
from moetrain.parallel.recompute import apply_recompute
from moetrain.schedules import bias_update_speed_at, global_batch_at, lr_at, mtp_lambda_at
from moetrain.train import Trainer


def _job(tmp_path, *overrides):
    base = [f"run.dir={tmp_path}", "logging.console=false", "train.steps=3", "train.val_interval=0",
            "data.demo_bytes=200000", "train.seq_len=64"]
    return to_job_config(compose(base + list(overrides)))


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_same_seed_gives_identical_losses(tmp_path):
    a = Trainer(_job(tmp_path / "a")).fit()
    b = Trainer(_job(tmp_path / "b")).fit()
    assert a == b and len(a) == 3
    c = Trainer(_job(tmp_path / "c", "train.seed=1")).fit()
    assert c != a


def test_grad_accumulation_matches_one_big_micro_batch(tmp_path):
    acc = Trainer(_job(tmp_path / "acc", "train.global_batch_size=8", "train.micro_batch_size=2"))
    big = Trainer(_job(tmp_path / "big", "train.global_batch_size=8", "train.micro_batch_size=8"))
    assert acc.job.train.grad_accum_steps == 4 and big.job.train.grad_accum_steps == 1
    la, lb = acc.fit(), big.fit()
    for x, y in zip(la, lb):
        assert abs(x - y) < 1e-5, (la, lb)
    pa, pb = _params(acc), _params(big)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_same_loss_gradients_and_counts(mode):
    torch.manual_seed(0)
    cfg = small_config()
    ref, rec = make_model(cfg), make_model(cfg)
    apply_recompute(rec, mode)
    tokens = torch.randint(0, 64, (2, 16))
    labels = tokens.roll(-1, 1)
    losses = []
    for m in (ref, rec):
        out = m(tokens, labels)
        loss = out.loss(out.n_tokens, 0.3)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(ref.named_parameters(), rec.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    # The router's forward runs again during recomputation; tokens must be counted once.
    (ids_ref, counts_ref), (ids_rec, counts_rec) = collect_expert_counts(ref), collect_expert_counts(rec)
    assert ids_ref == ids_rec == [1, 2] and counts_ref.sum() > 0 and torch.equal(counts_ref, counts_rec)
    # The balance-loss metric accumulates per forward: recomputation must not add to it either.
    bal_ref, bal_rec = pop_balance_loss(ref), pop_balance_loss(rec)
    assert list(bal_ref) == list(bal_rec) == [1, 2]
    for layer_id in bal_ref:
        torch.testing.assert_close(bal_rec[layer_id], bal_ref[layer_id], rtol=1e-6, atol=0)


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(5, cos, 110) == pytest.approx(0.5)
    assert lr_at(10, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cos, 110) == pytest.approx(0.1)
    v3 = OptimConfig(lr=2.2e-4, min_lr=2.2e-5, warmup_steps=10, schedule="v3", decay_start=0.5, decay_end=0.9,
                     final_lr=7.3e-6, final_start=0.95)
    assert lr_at(40, v3, 100) == pytest.approx(2.2e-4)  # constant phase
    assert lr_at(70, v3, 100) == pytest.approx(2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5))  # half-way through the cosine
    assert lr_at(92, v3, 100) == pytest.approx(2.2e-5)
    assert lr_at(96, v3, 100) == pytest.approx(7.3e-6)


def test_gamma_lambda_and_batch_ramp():
    t = TrainConfig(steps=100, bias_update_speed=0.001, bias_update_stop=0.9, mtp_lambda=0.3, mtp_lambda_final=0.1,
                    mtp_lambda_switch=0.5, global_batch_size=64, micro_batch_size=4, batch_ramp_start=16,
                    batch_ramp_tokens=1000)
    assert bias_update_speed_at(90, t) == 0.001 and bias_update_speed_at(91, t) == 0.0
    assert mtp_lambda_at(50, t) == 0.3 and mtp_lambda_at(51, t) == 0.1
    sizes = [global_batch_at(n, t, dp=2) for n in range(0, 1100, 100)]
    assert sizes[0] == 16 and sizes[-1] == 64 and sizes == sorted(sizes)
    assert all(s % 8 == 0 for s in sizes)
    assert global_batch_at(500, t, dp=2) == 40  # 16 + 48 * 0.5


def test_demo_end_to_end(tmp_path):
    """`moetrain train` with no arguments: loss falls by 30% or more, well below the text's unigram entropy."""
    run = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "moetrain", "train", f"run.dir={run}", "logging.interval=1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 301))
    keys = {"step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "tflops",
            "mfu", "max_violation", "max_violation_per_layer", "expert_bias_abs_mean", "memory_gb"}
    assert keys <= set(records[-1])
    first, last = records[0], records[-1]
    assert last["loss"] <= 0.7 * first["loss"], (first["loss"], last["loss"])
    entropy = float(proc.stdout.split("unigram entropy ")[1].split()[0])
    assert last["lm_loss"] < entropy - 0.5, (last["lm_loss"], entropy)
    assert len(last["max_violation_per_layer"]) == 4  # 3 MoE blocks + 1 MTP block
    assert "val_loss" in records[99] and (run / "config.yaml").exists()
    assert "step 300/300" in proc.stdout and "eta" in proc.stdout


def test_wandb_offline_run_is_written_by_rank0(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    job = _job(tmp_path, "logging.wandb.enabled=true", "logging.wandb.mode=offline", "logging.interval=1",
               "train.steps=2", "logging.wandb.name=unit")
    Trainer(job).fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_trains_from_a_blend_of_prepared_shards_with_document_masks(tmp_path):
    from moetrain.data.prepare import prepare_documents

    for name, n in (("a", 300), ("b", 200)):
        prepare_documents((f"{name} document {i} " * (i % 7 + 1) for i in range(n)), tmp_path / name,
                          shard_tokens=4000, progress=False)
    job = _job(tmp_path / "run", "data=shards", f"data.paths=[{tmp_path / 'a'},{tmp_path / 'b'}]",
               "data.weights=[3,1]", "data.document_mask=true", "train.val_interval=3", "logging.interval=3")
    trainer = Trainer(job)
    losses = trainer.fit()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert trainer.loader.state_dict()["blend"] == [[str(tmp_path / "a"), 3.0], [str(tmp_path / "b"), 1.0]]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["val_loss"])


def test_bf16_autocast_keeps_router_in_fp32_and_tracks_fp32_loss():
    torch.manual_seed(0)
    cfg = small_config()
    model = make_model(cfg)
    tokens = torch.randint(0, 64, (2, 16))
    labels = tokens.roll(-1, 1)
    seen = []
    gate = model.layers["1"].ffn.gate
    gate.register_forward_hook(lambda mod, inp, out: seen.append((out[1].dtype, out[2].dtype)))
    ref = model(tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens, labels)
    assert low.logits.dtype == torch.bfloat16 and seen[-1] == (torch.float32, torch.float32)
    ref_loss, low_loss = (ref.lm_loss_sum / ref.n_tokens).item(), (low.lm_loss_sum / low.n_tokens).item()
    assert abs(low_loss - ref_loss) < 0.02 * ref_loss


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_compiled_blocks_match_eager(recompute):
    torch.manual_seed(0)
    cfg = small_config()
    eager, compiled = make_model(cfg), make_model(cfg)
    apply_recompute(compiled, recompute)
    # The MoE blocks (layer 1 and the MTP module's): routing, dispatch, the grouped GEMM, the balance loss. NOTE: the
    # dense block 0 stays eager; its attention and MLP are the MoE block's own (compiling it adds only cold-cache
    # inductor builds, ~30 s of CI).
    for block in [compiled.layers["1"]] + [m.block for m in compiled.mtp.values()]:
        block.compile()
    tokens = torch.randint(0, 64, (2, 16))
    labels = tokens.roll(-1, 1)
    for m in (eager, compiled):
        out = m(tokens, labels)
        out.loss(out.n_tokens, 0.3).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Compiled recomputation must not count tokens or balance losses twice either.
    assert torch.equal(collect_expert_counts(eager)[1], collect_expert_counts(compiled)[1])
    bal_eager, bal_compiled = pop_balance_loss(eager), pop_balance_loss(compiled)
    assert list(bal_eager) == list(bal_compiled) == [1, 2]
    for layer_id in bal_eager:
        torch.testing.assert_close(bal_compiled[layer_id], bal_eager[layer_id], rtol=1e-5, atol=0)
