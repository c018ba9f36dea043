"""FP8: the blockwise quantisation (E4M3 bounds), the native provider's GEMMs against fp32, converted models keep
their names, training in native FP8 tracks fp32, checkpoints cross precisions, FP8 expert parallelism equals one
process, and FP8 is refused where it cannot run. Transformer Engine tests run only with TE and a Hopper GPU."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import small_job
from moetrain.checkpoint.convert import main as convert_main
from moetrain.config import compose, to_job_config
from moetrain.model import ConfigError, build_model
from moetrain.model.experts import GroupedExperts, expert_loop_mm
from moetrain.parallel.init import init_weights
from moetrain.precision import Precision
from moetrain.precision.blockwise import (E4M3, E4M3_MAX, dequantize_blocks, dequantize_tiles, quantize_blocks,
                                          quantize_tiles)
from moetrain.precision.native import FP8GroupedExperts, FP8Linear, Quantizers, convert_native
from moetrain.train import Trainer
from layouts import KEYS, final_model, train_layout, train_reference

# E4M3: 3 mantissa bits, so rounding to nearest is within 2^-4 of a normal value; below the smallest normal
# (2^-6 of the scale) the spacing is 2^-9 of the scale, so within 2^-10 of it.
REL, SUBNORMAL = 2.0 ** -4, 2.0 ** -10


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _scaled_data(*shape):
    """Random values over 6 decades, so that tiles and blocks have very different scales."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1]).roll(7)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(5, 300), (3, 128), (2, 4, 200)])
def test_tile_quantisation_is_within_the_e4m3_bound(shape, pow2):
    x = _scaled_data(*shape)
    if shape[-1] > 128:
        x[..., :128] = 0.0  # an all-zero tile stays exactly zero
    q, scale = quantize_tiles(x, pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == (*shape[:-1], -(-shape[-1] // 128))
    deq = dequantize_tiles(q, scale)
    tile_scale = scale.repeat_interleave(128, -1)[..., :shape[-1]]
    assert ((deq - x).abs() <= torch.maximum(x.abs() * REL, tile_scale * SUBNORMAL) * (1 + 1e-6)).all()
    # Every non-zero tile uses E4M3's range: its largest value maps to 448 (to (224, 448] with power-of-two scales).
    q_amax = torch.nn.functional.pad(q.float().abs(), (0, -shape[-1] % 128)).unflatten(-1, (-1, 128)).amax(-1)
    live = q_amax[q_amax > 0]
    # (an amax/scale in (224, 232) rounds to 224 in E4M3, hence >=)
    assert (live <= E4M3_MAX).all() and (live >= E4M3_MAX / 2 if pow2 else live == E4M3_MAX).all()
    if pow2:
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    if shape[-1] > 128:
        assert (deq[..., :128] == 0).all()


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 130, 260)])
def test_block_quantisation_is_within_the_e4m3_bound(shape, pow2):
    w = _scaled_data(*shape)
    q, scale = quantize_blocks(w, pow2)
    R, G = -(-shape[-2] // 128), -(-shape[-1] // 128)
    assert scale.shape == (*shape[:-2], R, G)
    block_scale = scale.repeat_interleave(128, -2)[..., :shape[-2], :].repeat_interleave(128, -1)[..., :shape[-1]]
    deq = dequantize_blocks(q, scale)
    assert ((deq - w).abs() <= torch.maximum(w.abs() * REL, block_scale * SUBNORMAL) * (1 + 1e-6)).all()
    # One scale per block: the block's largest magnitude over E4M3's largest value (rounded up to a power of two);
    # the last block, shorter at the edges, too.
    for rows, cols, r, g in ((slice(0, 128), slice(0, 128), 0, 0), (slice(128 * (R - 1), None),
                                                                   slice(128 * (G - 1), None), R - 1, G - 1)):
        ref = w[..., rows, cols].abs().amax(dim=(-2, -1)) / E4M3_MAX
        ref = torch.exp2(torch.ceil(torch.log2(ref))) if pow2 else ref
        torch.testing.assert_close(scale[..., r, g], ref)


def test_fp8_linear_forward_and_backward_track_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(384, 200, bias=False)
    fp8 = FP8Linear.from_linear(nn.Linear(384, 200, bias=False), Quantizers())
    fp8.weight = nn.Parameter(linear.weight.detach().clone())
    x = torch.randn(33, 384)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(33, 200)
    y_ref, y = linear(x_ref), fp8(x_fp8)
    y_ref.backward(dy)
    y.backward(dy)
    assert 0 < _rel(y.detach(), y_ref.detach()) < 6e-2
    assert 0 < _rel(x_fp8.grad, x_ref.grad) < 6e-2
    assert 0 < _rel(fp8.weight.grad, linear.weight.grad) < 6e-2


def test_fp8_linear_under_bf16_autocast_with_bias():
    torch.manual_seed(0)
    linear = nn.Linear(256, 160)
    fp8 = FP8Linear.from_linear(linear, Quantizers())
    x = torch.randn(9, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert linear.bias.grad is not None and torch.allclose(linear.bias.grad, torch.full((160,), 9.0))
    assert 0 < _rel(y.detach(), linear(x).detach()) < 6e-2


def test_fp8_grouped_linear_forward_and_backward_track_fp32():
    torch.manual_seed(0)
    fp8 = FP8GroupedExperts.from_experts(GroupedExperts(4, 256, 192), Quantizers())
    counts = torch.tensor([37, 0, 129, 5])  # an expert without tokens, one across a 128-row boundary
    x, w = torch.randn(int(counts.sum()), 256), torch.randn(4, 192, 256) * 0.05
    dy = torch.randn(int(counts.sum()), 192)
    x_ref, w_ref, x_fp8, w_fp8 = (t.clone().requires_grad_() for t in (x, w, x, w))
    y_ref = expert_loop_mm(x_ref, w_ref, counts)  # one matmul per expert, fp32
    y = fp8.grouped_mm(x_fp8, w_fp8, counts)
    y_ref.backward(dy)
    y.backward(dy)
    assert 0 < _rel(y.detach(), y_ref.detach()) < 6e-2
    assert 0 < _rel(x_fp8.grad, x_ref.grad) < 6e-2
    assert w_fp8.grad[1].abs().sum() == 0 and 0 < _rel(w_fp8.grad, w_ref.grad) < 6e-2


def test_converted_model_keeps_names_and_every_parameter_gets_a_gradient():
    job = small_job("/tmp/unused")
    plain, fp8 = build_model(job.model, "meta"), build_model(job.model, "meta")
    convert_native(fp8)
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    kinds = {type(m) for m in fp8.modules()}
    assert FP8Linear in kinds and FP8GroupedExperts in kinds
    assert type(fp8.head) is nn.Linear  # the head stays in high precision, as the embedding and router do
    fp8 = fp8.to_empty(device="cpu")
    init_weights(fp8, 0)
    tokens = torch.randint(0, job.model.vocab_size, (4, 65))
    fp8(tokens[:, :-1], tokens[:, 1:]).loss(256, 0.3).backward()
    no_grad = [n for n, p in fp8.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


TINY_RUN = ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "logging.interval=10"]


def _fit(run_dir, *overrides):
    trainer = Trainer(small_job(run_dir, *TINY_RUN, *overrides))
    trainer.resume_or_init()
    return trainer, trainer.fit()


def test_native_fp8_training_tracks_fp32(tmp_path):
    """The demo (tiny model, shipped text) for 200 steps, on small batches to keep CI short."""
    _, fp32 = _fit(tmp_path / "fp32", "train.steps=200")
    _, fp8 = _fit(tmp_path / "fp8", "train.steps=200", "precision=fp8", "precision.fp8.provider=native")
    tail = lambda losses: sum(losses[-20:]) / 20  # noqa: E731
    assert fp8 != fp32  # it did quantise
    assert fp32[0] - tail(fp32) > 1.0  # it did learn
    assert abs(tail(fp8) - tail(fp32)) <= 0.02 * tail(fp32), (tail(fp8), tail(fp32))


def test_bf16_checkpoint_resumes_in_fp8_and_back_and_exports_to_hf(tmp_path):
    _fit(tmp_path / "run", "train.steps=6", "train.stop_at=2", "precision=bf16")
    fp8, losses = _fit(tmp_path / "run", "train.steps=6", "train.stop_at=4", "precision=fp8",
                       "precision.fp8.provider=native")
    assert fp8.step == 4 and len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    _, losses = _fit(tmp_path / "run", "train.steps=6", "precision=bf16")  # and back
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    fp8.close()
    assert convert_main(["--to-hf", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf")]) == 0
    from moetrain.hf import from_hf_pretrained

    exported = from_hf_pretrained(tmp_path / "hf")
    from moetrain.checkpoint.convert import load_checkpoint_model
    from moetrain.checkpoint.manager import resolve_checkpoint

    mine = load_checkpoint_model(resolve_checkpoint(tmp_path / "run" / "checkpoints")).state_dict()
    assert set(exported.state_dict()) == set(mine)
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, mine[k].float(), msg=k)


def test_quantisers_of_a_shard_equal_those_of_the_whole_bit_for_bit():
    """What makes a layout's FP8 exact: an expert-parallel rank quantises its tokens' rows (1 x 128 tiles) and its
    experts' weights (128 x 128 blocks per expert), and gets exactly the whole tensor's values there."""
    for pow2 in (False, True):
        x = _scaled_data(37, 300)
        rows = torch.tensor([3, 0, 36, 17, 5])  # any subset of tokens, in any order (the dispatcher's)
        for got, want in zip(quantize_tiles(x[rows], pow2), quantize_tiles(x, pow2)):
            assert torch.equal(got.view(torch.uint8) if got.dtype == E4M3 else got,
                               want[rows].view(torch.uint8) if want.dtype == E4M3 else want[rows])
        w = _scaled_data(6, 200, 130)  # 6 experts, edge blocks on both dims
        for got, want in zip(quantize_blocks(w[2:5], pow2), quantize_blocks(w, pow2)):
            assert torch.equal(got.view(torch.uint8) if got.dtype == E4M3 else got,
                               want[2:5].view(torch.uint8) if want.dtype == E4M3 else want[2:5])


def _relative_gaps(a: list[dict], b: list[dict], keys, steps=slice(None)) -> float:
    return max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(a[steps], b[steps]) for k in keys)


def _weight_gaps(a: dict, b: dict) -> torch.Tensor:
    """Per parameter tensor, ||a - b|| / ||b|| (the router biases, which move by +-gamma steps, aside)."""
    return torch.tensor([float((a[k] - b[k]).norm() / b[k].norm()) for k in b if not k.endswith("expert_bias")])


def test_native_fp8_expert_parallel_equals_one_process(tmp_path, fp32_reference):
    """ep 2 on 2 data-parallel ranks (experts split, tokens exchanged all-to-all) in native FP8 against one FP8
    process on other CPU kernels, bounded by FP8's own error.

    A layout changes fp32 summation orders, and a 1-ulp change just before a quantisation can move a value to the
    next E4M3 step (2^-3 relative): beyond the forward of step 1, agreement to fp32's 1e-5 would be luck. The
    error FP8 itself makes is the yardstick, measured in this run as the gap between one FP8 process and one
    fp32 process. Measured (2026-12-07, x86 AVX-512 host, the ranks on DEFAULT, AVX2 and AVX512 kernels in turn,
    the references on the others): FP8 vs fp32 gaps of losses <= 3.2e-4, gradient norms <= 2.6e-3, weights
    (median over tensors) 4.4e-3 (worst 1.2e-2), MaxVio 0.13; the layout moved them by <= 3.4e-5, 1.4e-3,
    1.3e-3 (4.6e-3), 0.04. Bounds: FP8's gap, and half of it for the losses, which a layout that skipped a
    quantisation (a loss gap as large as FP8's) or mis-scaled one (larger) exceeds."""
    fp32_dir, fp32 = fp32_reference
    fp8 = ["precision=fp8", "precision.fp8.provider=native"]
    ref = train_reference(tmp_path / "one", *fp8)
    got = train_layout(tmp_path / "ep2dp2", 2, "parallel.ep=2", *fp8)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    losses = [k for k in KEYS if k.endswith("loss")]
    # Step 1's forward sees the same weights in both, and quantises each token's rows alike: fp32's bound.
    assert _relative_gaps(got, ref, losses, slice(0, 1)) <= 1e-5
    fp8_error = {"loss": _relative_gaps(ref, fp32, losses), "grad_norm": _relative_gaps(ref, fp32, ["grad_norm"])}
    assert fp8_error["loss"] > 1e-5  # FP8 did quantise: its gap is beyond fp32's own layout bound
    assert _relative_gaps(got, ref, losses) <= fp8_error["loss"] / 2, fp8_error
    assert _relative_gaps(got, ref, ["grad_norm"]) <= fp8_error["grad_norm"], fp8_error
    maxvio = lambda a, b: max(abs(u - v) for x, y in zip(a, b)  # noqa: E731
                              for u, v in zip(x["max_violation_per_layer"], y["max_violation_per_layer"]))
    assert maxvio(got, ref) <= maxvio(ref, fp32)
    weights, want = final_model(tmp_path / "ep2dp2"), final_model(tmp_path / "one")
    assert weights.keys() == want.keys()
    layout_gaps, fp8_gaps = _weight_gaps(weights, want), _weight_gaps(want, final_model(fp32_dir))
    assert layout_gaps.median() <= fp8_gaps.median() and layout_gaps.max() <= fp8_gaps.max(), (layout_gaps, fp8_gaps)


def test_fp8_where_it_cannot_run_is_refused_or_falls_back(tmp_path):
    cpu = torch.device("cpu")
    job = small_job(tmp_path / "a", "precision=fp8")  # provider te, the default
    with pytest.raises(ConfigError) as e:
        Precision(job.precision, cpu)
    assert str(e.value).startswith("precision.fp8.provider") and "provider=native" in str(e.value)
    warnings = []
    p = Precision(small_job(tmp_path / "b", "precision=fp8", "precision.fp8.fallback=bf16").precision, cpu,
                  warnings.append)
    assert p.fp8 is None and p.compute_dtype == torch.bfloat16 and len(warnings) == 1
    with pytest.raises(ConfigError, match="precision.fp8.recipe: delayed scaling is Transformer Engine's"):
        to_job_config(compose(["precision=fp8", "precision.fp8.provider=native", "precision.fp8.recipe=delayed"]))
    # From the command line: one line naming the key, exit 2, nothing trained.
    proc = subprocess.run([sys.executable, "-m", "moetrain", "train", f"run.dir={tmp_path / 'c'}", "precision=fp8"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "precision.fp8.provider" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------ Transformer Engine
def test_te_plan_converts_every_gemm_the_recipe_can_tile():
    """Which modules the TE provider runs in FP8 (no TE needed to decide): DeepSeek-V3's all, the proxy's all but
    the dense layers' down projection (10944 inputs, not whole 128-tiles)."""
    from moetrain.precision.te import te_plan

    v3 = build_model(to_job_config(compose(["model=deepseek_v3_671b"])).model, "meta")
    fp8, kept = te_plan(v3, "blockwise")
    linears = [n for n, m in v3.named_modules() if type(m) is nn.Linear and n != "head"]
    experts = [n for n, m in v3.named_modules() if type(m) is GroupedExperts]
    assert not kept and sorted(fp8) == sorted(linears + experts)
    assert "layers.0.attn.wkv_a" in fp8  # 576 outputs: a partial 128-block along the output is fine
    proxy_cfg = to_job_config(compose(["model=proxy"])).model
    fp8, kept = te_plan(build_model(proxy_cfg, "meta"), "blockwise")
    assert kept == [f"layers.{i}.ffn.w2" for i in range(proxy_cfg.moe.first_k_dense_replace)]
    assert te_plan(build_model(proxy_cfg, "meta"), "current")[1] == []



@pytest.mark.parametrize("align", [16, 32])
def test_padded_rows_and_their_row_index_match_a_python_reference(align):
    """Per expert: rows rounded up to the recipe's alignment, and each row's place in the padded layout, against a
    loop over experts; experts without tokens, counts already aligned, and ragged ones."""
    from moetrain.precision.te import padded_row_index, padded_rows

    for counts in ([37, 0, 16, 5], [0, 0, 0], [align, 2 * align, 0, align], [1], [0, 3, 0, align + 1, 0]):
        want_rows, want_index, start = [], [], 0
        for c in counts:
            padded = -(-c // align) * align
            want_rows.append(padded)
            want_index += range(start, start + c)
            start += padded
        assert padded_rows(counts, align) == want_rows
        assert all(p % align == 0 and 0 <= p - c < align for p, c in zip(want_rows, counts))
        index = padded_row_index(torch.tensor(counts), align, sum(counts))
        assert index.tolist() == want_index and index.dtype == torch.long


def test_te_rows_alignment_per_recipe():
    """TE's FP8 grouped GEMM wants m_splits in multiples of 16 (blockwise, current, delayed), MXFP8 of 32: no more
    (128 rows for blockwise would pad an expert of 17 tokens to 128)."""
    from moetrain.precision.te import _ROWS, padded_rows

    counts = [0, 1, 16, 17, 33]
    assert {r: padded_rows(counts, _ROWS[r]) for r in ("blockwise", "current", "delayed", "mxfp8")} == {
        "blockwise": [0, 16, 16, 32, 48], "current": [0, 16, 16, 32, 48], "delayed": [0, 16, 16, 32, 48],
        "mxfp8": [0, 32, 32, 32, 64]}


def test_te_capability_check_prefers_the_is_available_functions():
    """TE >= 2.9 judges recipes by ``te.is_*_available(return_reason=True)`` (its ``te.fp8`` may be None); older
    versions by ``te.fp8.check_*_support()``; a TE with neither is reported, not silently passed."""
    from moetrain.precision.te import capability_check

    new = {"is_fp8_available", "is_fp8_block_scaling_available", "is_mxfp8_available", "Linear"}
    old = {"check_fp8_support", "check_fp8_block_scaling_support", "check_mxfp8_support", "fp8_autocast"}
    want_new = {"blockwise": "is_fp8_block_scaling_available", "mxfp8": "is_mxfp8_available",
                "current": "is_fp8_available", "delayed": "is_fp8_available"}
    want_old = {"blockwise": "check_fp8_block_scaling_support", "mxfp8": "check_mxfp8_support",
                "current": "check_fp8_support", "delayed": "check_fp8_support"}
    for recipe in want_new:
        assert capability_check(recipe, new, ()) == ("", want_new[recipe])
        assert capability_check(recipe, new, old) == ("", want_new[recipe])  # both: the new one
        assert capability_check(recipe, {"Linear"}, old) == ("fp8", want_old[recipe])
        assert capability_check(recipe, {"Linear"}, {"fp8_autocast"}) is None
    # A TE with only the plain FP8 check says nothing about blockwise scaling.
    assert capability_check("blockwise", {"is_fp8_available"}, {"check_fp8_support"}) is None


class _GroupedLinearStandIn(nn.Module):
    """``te.GroupedLinear``'s interface in torch (``weight{e}`` [out, in]; ``forward(x, m_splits)``), holding the
    glue to TE's contract: m_splits a list of Python ints, each a multiple of the alignment, covering every row."""

    def __init__(self, n_gemms, in_features, out_features, align, device, made):
        super().__init__()
        self.align = align
        for e in range(n_gemms):
            self.register_parameter(f"weight{e}", nn.Parameter(torch.empty(out_features, in_features, device=device)))
        made.append((self, torch.device(device)))

    def forward(self, x, m_splits):
        assert type(m_splits) is list and all(type(m) is int and m % self.align == 0 for m in m_splits), m_splits
        assert sum(m_splits) == x.shape[0]
        outs = [xs @ getattr(self, f"weight{e}").T for e, xs in enumerate(x.split(m_splits))]
        return torch.cat(outs)


def _te_experts(E=4, D=32, F=48, align=16):
    from moetrain.precision.te import TEGroupedExperts

    torch.manual_seed(0)
    plain = GroupedExperts(E, D, F)
    for w in (plain.w1, plain.w3, plain.w2):
        nn.init.normal_(w, std=0.1)
    made = []
    te_experts = TEGroupedExperts.from_experts(plain, align, lambda n, i, o: _GroupedLinearStandIn(
        n, i, o, align, "meta", made))
    return plain, te_experts, made


def _grads(experts, x, counts, dy):
    x = x.clone().requires_grad_()
    for w in (experts.w1, experts.w3, experts.w2):
        w.grad = None
    y = experts(x, counts)
    y.backward(dy)
    return y.detach(), x.grad, [w.grad.clone() for w in (experts.w1, experts.w3, experts.w2)]


def test_te_experts_glue_equals_the_plain_experts_with_one_host_read():
    """TEGroupedExperts' padding, per-weight modules and weight views, with a torch stand-in for te.GroupedLinear:
    outputs and gradients equal the plain experts' (zero padding rows add nothing), one ``.tolist()`` per call."""
    from moetrain.host_syncs import HostSyncCounter

    plain, te_experts, made = _te_experts()
    assert te_experts.w1 is plain.w1  # the same Parameters
    counts = torch.tensor([37, 0, 16, 5])  # ragged, no tokens, already aligned
    x, dy = torch.randn(58, 32), torch.randn(58, 32)
    with HostSyncCounter() as syncs:
        got = _grads(te_experts, x, counts, dy)
    assert syncs.total == 1 and syncs.by_op == {"tolist": 1}, syncs.by_op
    want = _grads(plain, x, counts, dy)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[2][0][1].abs().sum() == 0  # expert 1 saw no tokens


def test_te_experts_one_module_per_weight_built_on_meta_with_views_set_once():
    plain, te_experts, made = _te_experts()
    counts = torch.tensor([3, 20, 0, 9])
    x = torch.randn(32, 32)
    with torch.no_grad():  # views first made without grad must still carry gradients later
        te_experts(x, counts)
    gemms = te_experts.gemms.modules
    assert sorted(gemms) == ["w1", "w2", "w3"] and len({id(m) for m in gemms.values()}) == 3
    assert [d.type for _, d in made] == ["meta"] * 3 and {id(m) for m, _ in made} == {id(m) for m in gemms.values()}
    for name, gemm in gemms.items():
        w = getattr(plain, name)
        for e in range(4):  # each expert's weight is a view of the stacked Parameter, at its place
            v = getattr(gemm, f"weight{e}")
            assert v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() and v.shape == w.shape[1:]
            assert v.data_ptr() == w.data_ptr() + e * w.stride(0) * w.element_size()
    views = {n: g._parameters["weight0"] for n, g in gemms.items()}
    dy = torch.randn(32, 32)
    got = _grads(te_experts, x, counts, dy)
    assert all(g._parameters["weight0"] is views[n] for n, g in gemms.items())  # not set again
    want = _grads(plain, x, counts, dy)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # New storage under the same Parameter (as a reshard that reallocates): the views follow it.
    plain.w2.data = plain.w2.data * 2
    got = _grads(te_experts, x, counts, dy)
    assert gemms["w2"]._parameters["weight0"] is not views["w2"]
    assert gemms["w1"]._parameters["weight0"] is views["w1"]
    torch.testing.assert_close(got[0], _grads(plain, x, counts, dy)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_te_fp8_with_recomputation_is_accepted_but_not_with_split_backward(recompute):
    job = to_job_config(compose(["precision=fp8", "precision.fp8.provider=te", f"train.recompute={recompute}"]))
    assert job.train.recompute == recompute and job.precision.fp8.provider == "te"
    pp = ["parallel.pp=2", "parallel.dp=1", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_chunks=2",
          "train.global_batch_size=8", "train.micro_batch_size=1"]
    job = to_job_config(compose(["precision=fp8", "precision.fp8.provider=te", "train.recompute=none", *pp]), 2)
    assert job.parallel.pp_schedule == "ZBVZeroBubble"  # the layout itself is valid
    with pytest.raises(ConfigError, match="train.recompute"):
        to_job_config(compose(["precision=fp8", "precision.fp8.provider=te", f"train.recompute={recompute}", *pp]), 2)


def test_native_fp8_with_full_recomputation_gives_the_same_gradients():
    """The native quantisers are deterministic functions of their inputs: the recomputed forward quantises the same
    fp32 values to the same E4M3 values, so gradients agree to fp32's summation-order noise (the bound of
    tests/test_train.py's recomputation test); the recomputation runs through the checkpoint function given."""
    from conftest import make_model, small_config
    from torch.utils.checkpoint import checkpoint

    from moetrain.parallel.recompute import apply_recompute

    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(fn)
        return checkpoint(fn, *args, **kwargs)

    cfg = small_config()
    fp32, ref, rec = make_model(cfg), make_model(cfg), make_model(cfg)
    convert_native(ref)
    convert_native(rec)
    apply_recompute(rec, "full", spy)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (fp32, ref, rec):
        out = m(tokens, tokens.roll(-1, 1))
        loss = out.loss(out.n_tokens, 0.3)
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == cfg.n_layers + cfg.n_mtp_layers  # every block, the MTP module's included
    assert losses[0] != losses[1]  # it did quantise
    assert torch.equal(losses[1], losses[2])
    for (name, p), q in zip(ref.named_parameters(), rec.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def _te_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "Transformer Engine tests need a CUDA GPU (none here)"
    if torch.cuda.get_device_capability() < (9, 0):
        return f"Transformer Engine FP8 tests need a Hopper or newer GPU, not {torch.cuda.get_device_name()}"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as e:
        return f"Transformer Engine is not installed ({e})"
    return None


te_only = pytest.mark.skipif(_te_skip_reason() is not None, reason=_te_skip_reason() or "")


@te_only
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["blockwise", "current", "delayed"])
def test_te_linear_and_experts_track_bf16(recipe):
    from moetrain.precision.te import TEGroupedExperts, convert_te, te_autocast

    torch.manual_seed(0)
    cfg = to_job_config(compose(["model=proxy"])).model
    ref, fp8 = build_model(cfg, "meta"), build_model(cfg, "meta")
    convert_te(fp8, recipe)
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert any(isinstance(m, TEGroupedExperts) for m in fp8.modules())
    ref, fp8 = ref.to_empty(device="cuda"), fp8.to_empty(device="cuda")
    init_weights(ref, 0)
    init_weights(fp8, 0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 257), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref(tokens[:, :-1], tokens[:, 1:]).loss(512, 0.3).backward()
        with te_autocast(recipe):
            out = fp8(tokens[:, :-1], tokens[:, 1:])
        out.loss(512, 0.3).backward()
    for (name, p), q in zip(ref.named_parameters(), fp8.parameters()):
        assert q.grad is not None and _rel(q.grad, p.grad) < 0.15, name

    for experts in (m for m in fp8.modules() if isinstance(m, TEGroupedExperts)):  # one GroupedLinear per weight
        gemms = experts.gemms.modules
        assert sorted(gemms) == ["w1", "w2", "w3"] and len({id(g) for g in gemms.values()}) == 3
        assert all(g.weight0.data_ptr() == getattr(experts, n).data_ptr() for n, g in gemms.items())


@te_only
@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_te_recomputation_gives_the_gradients_of_no_recomputation(recompute):
    """TE's checkpoint re-runs the forward inside the recipe's autocast, with the forward's scaling state: the same
    FP8 operands, so the gradients of a recomputed model equal those of a plain one up to GEMM summation order."""
    from moetrain.parallel.recompute import apply_recompute
    from moetrain.precision.te import convert_te, te_autocast, te_checkpoint

    cfg = to_job_config(compose(["model=proxy"])).model
    models = []
    for mode in ("none", recompute):
        model = build_model(cfg, "meta")
        apply_recompute(model, mode, te_checkpoint())
        convert_te(model, "blockwise")
        model = model.to_empty(device="cuda")
        init_weights(model, 0)
        models.append(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with te_autocast("blockwise"):
                out = model(tokens[:, :-1], tokens[:, 1:])
            out.loss(512, 0.3).backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert q.grad is not None and _rel(q.grad, p.grad) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_only_where_asked_for():
    """precision.tf32 switches CUDA's fp32 matmuls to TF32 (10-bit mantissa) and back; off, they are IEEE fp32."""
    from moetrain.config import PrecisionConfig

    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    exact = (a.double() @ b.double()).float()
    errors = {}
    for tf32 in (True, False):
        Precision(PrecisionConfig(dtype="bf16", tf32=tf32), torch.device("cuda"))
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
        errors[tf32] = _rel(a @ b, exact)
    # fp32 accumulates 24-bit products (relative error ~1e-7 here); TF32 rounds the inputs to 11 bits (~1e-4).
    assert errors[False] < 1e-5 < errors[True]
