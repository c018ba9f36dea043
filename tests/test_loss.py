"""The chunked cross entropy (train.loss_chunk_tokens) against the plain one: the loss and every gradient, alone,
through the whole model with MTP, through a pipeline's last stage and through the trainer; the memory it keeps, as
the allocator counts it."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, small_config, small_job
from moetrain.config import compose, to_job_config
from moetrain.model import IGNORE_INDEX, stage_lm_output
from moetrain.model.loss import chunked_ce_sum
from moetrain.parallel.pipeline_layout import SCHEDULES

_spec = importlib.util.spec_from_file_location("recompute_bench", Path(__file__).parents[1] / "benchmarks" / "recompute.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

FP32 = 1e-6  # relative agreement in fp32 (only the summation order differs)
BF16 = 2 ** -7  # bf16's relative rounding: the bound under bf16 autocast


def _relative(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def _reference_ce_sum(h_ND, w_VD, labels_N):
    return F.cross_entropy(F.linear(h_ND, w_VD).float(), labels_N, ignore_index=IGNORE_INDEX, reduction="sum")


def _inputs(N=37, D=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3], labels[10:14] = IGNORE_INDEX, IGNORE_INDEX  # ignored tokens, one alone and a run
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 100])  # 5 and 8 do not divide 37; 100 is more than all tokens
def test_loss_and_gradients_equal_the_unchunked(chunk):
    h, w, labels = _inputs()
    ref = _reference_ce_sum(h, w, labels)
    ref_h, ref_w = torch.autograd.grad(ref * 0.7, (h, w))  # a non-unit upstream gradient
    got = chunked_ce_sum(h, w, labels, chunk)
    got_h, got_w = torch.autograd.grad(got * 0.7, (h, w))
    assert got.dtype == torch.float32 and got.shape == ()
    assert _relative(got, ref) < FP32
    assert _relative(got_h, ref_h) < FP32 and _relative(got_w, ref_w) < FP32
    assert got_h[3].abs().max() == 0 and got_h[10:14].abs().max() == 0  # ignored tokens get no gradient


def test_bf16_autocast_stays_within_bf16_rounding():
    h, w, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference_ce_sum(h, w, labels)
        got = chunked_ce_sum(h, w, labels, 8)
    # Backward outside the autocast region, as the runner calls it: the chunks' logits are recomputed in bf16.
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    got_h, got_w = torch.autograd.grad(got, (h, w))
    exact_h, exact_w = torch.autograd.grad(_reference_ce_sum(h, w, labels), (h, w))
    assert _relative(got, ref) < FP32  # the same bf16 logits, the same fp32 softmax
    for got_g, ref_g, exact_g in ((got_h, ref_h, exact_h), (got_w, ref_w, exact_w)):
        assert got_g.dtype == torch.float32
        assert _relative(got_g, ref_g) < BF16
        assert _relative(got_g, exact_g) > 0  # the logits really were bf16
        assert _relative(got_g, exact_g) < 2 * _relative(ref_g, exact_g) + BF16


def test_chunk_must_hold_a_token():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        chunked_ce_sum(h, w, labels, 0)


def _model_grads(model, tokens, labels, chunk, autocast=False):
    model.loss_chunk_tokens = chunk
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens, labels)
        loss = out.loss(out.n_tokens, 0.3)
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 24, 1000])  # 7 does not divide 2 x 12 tokens; 1000 holds them all
def test_whole_model_with_mtp_matches_the_unchunked(chunk):
    torch.manual_seed(0)
    cfg = small_config()
    cfg.n_mtp_layers = 2
    model = make_model(cfg)
    tokens = torch.randint(0, 64, (2, 12))
    labels = tokens.roll(-1, 1)
    labels[0, 4:6] = IGNORE_INDEX
    ref, ref_grads = _model_grads(model, tokens, labels, 0)
    got, got_grads = _model_grads(model, tokens, labels, chunk)
    assert ref.logits is not None and got.logits is None  # no full logits on the chunked path
    assert torch.equal(got.n_tokens, ref.n_tokens) and len(got.mtp_loss_sums) == 2
    assert _relative(got.lm_loss_sum, ref.lm_loss_sum) < FP32
    for k in range(2):
        assert _relative(got.mtp_loss_sums[k], ref.mtp_loss_sums[k]) < FP32
    assert set(got_grads) == set(ref_grads) and "head.weight" in got_grads and "mtp.1.eh_proj.weight" in got_grads
    for name in ref_grads:
        assert _relative(got_grads[name], ref_grads[name]) < FP32, name


def test_whole_model_under_bf16_autocast_is_as_close_to_fp32_as_the_unchunked():
    torch.manual_seed(0)
    model = make_model(small_config())
    tokens = torch.randint(0, 64, (2, 16))
    labels = tokens.roll(-1, 1)
    _, exact = _model_grads(model, tokens, labels, 0)
    ref, ref_grads = _model_grads(model, tokens, labels, 0, autocast=True)
    got, got_grads = _model_grads(model, tokens, labels, 5, autocast=True)
    assert ref.logits.dtype == torch.bfloat16
    assert _relative(got.lm_loss_sum, ref.lm_loss_sum) < FP32  # the same bf16 logits, the same fp32 softmax
    assert _relative(got.mtp_loss_sums[0], ref.mtp_loss_sums[0]) < FP32
    # The chunked path rounds h's gradient once instead of per matmul: the two bf16 runs then part by bf16 noise
    # compounded through the blocks (measured up to 1e-2), each as far from fp32 as the other (ratio <= 1.6).
    for name in ref_grads:
        assert _relative(got_grads[name], ref_grads[name]) < 2 * BF16, name
        assert _relative(got_grads[name], exact[name]) < 2 * _relative(ref_grads[name], exact[name]) + BF16 / 4, name


def _peak_bytes(fn) -> int:
    """The most bytes allocated at once while ``fn`` runs, above its start, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        marker = torch.empty(1)
    return bench._allocated_at(prof, marker.data_ptr())[1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunked_loss_keeps_one_chunk_of_logits(dtype):
    N, D, V, C = 2048, 64, 32000, 256
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g)).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    per_logit = 4 if dtype == "fp32" else 2 + 4  # fp32 logits; bf16 logits and their fp32 copy
    logits_bytes, chunk_bytes, weight_bytes = N * V * 4, C * V * per_logit, V * D * 4

    def step(loss_fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = loss_fn()
            loss.backward()
        return run

    plain = _peak_bytes(step(lambda: _reference_ce_sum(h, w, labels)))
    h.grad = w.grad = None
    chunked = _peak_bytes(step(lambda: chunked_ce_sum(h, w, labels, C)))
    assert plain >= 2 * logits_bytes  # the fp32 logits and the log-softmax the cross entropy keeps
    # One chunk's logits (forward) or one block's (backward), the weight's gradient and its bf16 copy, h's
    # gradient (fp32) and its compute-dtype copy: nothing of size N x V (measured: fp32 41 MB, bf16 56 MB of 750).
    assert chunked <= 1.1 * chunk_bytes + 1.5 * weight_bytes + 2 * N * D * 4, (chunked, chunk_bytes)
    assert chunked < plain / 10


def test_trainer_losses_equal_with_the_key_on(tmp_path):
    off = small_job(tmp_path / "off", "model=tiny", "train.steps=2")
    on = small_job(tmp_path / "on", "model=tiny", "train.steps=2", "train.loss_chunk_tokens=100")
    assert on.train.loss_chunk_tokens == 100 and off.train.loss_chunk_tokens == 0
    from moetrain.train import Trainer

    chunked = Trainer(on)
    assert chunked.model.loss_chunk_tokens == 100  # parallelize hands the key to the model
    ref, got = Trainer(off).fit(), chunked.fit()
    assert len(ref) == len(got) == 2
    for a, b in zip(got, ref):
        assert abs(a - b) <= FP32 * abs(b), (got, ref)


@pytest.mark.parametrize("value", ["-1", "1.5", "true"])
def test_bad_chunk_sizes_name_the_key(value):
    with pytest.raises(Exception) as e:
        to_job_config(compose([f"train.loss_chunk_tokens={value}"]))
    assert "loss_chunk_tokens" in str(e.value)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_pipeline_schedule_accepts_the_chunked_loss(schedule):
    job = to_job_config(compose(["parallel.pp=2", f"parallel.pp_schedule={schedule}", "train.loss_chunk_tokens=512",
                                 "train.global_batch_size=32", "train.micro_batch_size=4"]), 2)
    assert job.train.loss_chunk_tokens == 512 and job.parallel.pp == 2


def test_pipeline_last_stage_computes_the_chunked_loss_and_returns_no_logits():
    """Two stages of one model in one process: the last one, given the labels, returns the 0-dim loss sums of the
    main and MTP heads, never calls the head and keeps no [tokens, vocab] tensor for backward; the loss and every
    gradient equal the unchunked whole model's."""
    torch.manual_seed(0)
    cfg = small_config()
    cfg.n_mtp_layers, cfg.vocab_size = 2, 80  # V = 80: no other width of the model (64 = 2D is eh_proj's input)
    model = make_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = tokens.roll(-1, 1)
    labels[0, 4:6] = IGNORE_INDEX
    ref, ref_grads = _model_grads(model, tokens, labels, 0)

    model.loss_chunk_tokens = 7  # before stage(): every stage takes the model's value
    first, last = model.stage([0], True, False, model.embed), model.stage([1], False, True, model.embed)
    assert last.loss_chunk_tokens == 7
    model.zero_grad(set_to_none=True)
    saved_V = []  # shapes of the tensors autograd keeps whose last dimension is the vocabulary

    def pack(t):
        if t.dim() and t.shape[-1] == cfg.vocab_size:
            saved_V.append(tuple(t.shape))
        return t

    hook = model.head.register_forward_hook(lambda *_: pytest.fail("the chunked stage called the head"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = last(first(tokens), labels_BT=labels, tokens_BT=tokens)
    hook.remove()
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [torch.Size([])] * 3
    assert saved_V == []
    got = stage_lm_output(outputs, labels, chunked=True)
    got.loss(got.n_tokens, 0.3).backward()
    assert got.logits is None and torch.equal(got.n_tokens, ref.n_tokens)
    assert _relative(got.lm_loss_sum, ref.lm_loss_sum) < FP32
    for k in range(2):
        assert _relative(got.mtp_loss_sums[k], ref.mtp_loss_sums[k]) < FP32
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert _relative(grads[name], ref_grads[name]) < FP32, name
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):  # no labels: no loss, and no logits either
        last(first(tokens), tokens_BT=tokens)


# FSDP2 with the chunked loss against one unchunked process: one of tests/test_expert_parallel.py's layout launches;
# under pipeline stages with FSDP2, ZBVZeroBubble and MTP depth 2: one of tests/test_pipeline.py's.


def test_a_step_with_the_chunked_loss_reads_the_host_once(tmp_path):
    """The chunked loss adds no host sync (no data-dependent shapes: ignored labels are masked, not selected)."""
    from moetrain.host_syncs import HostSyncCounter
    from moetrain.train import Trainer

    trainer = Trainer(small_job(tmp_path, "train.steps=5", "train.loss_chunk_tokens=100"))
    for _ in range(2):
        trainer.step += 1
        with HostSyncCounter() as syncs:
            trainer.train_step()
        assert dict(syncs.by_op) == {"tolist": 1}  # as without it (tests/test_host_syncs.py)
    trainer.close()
