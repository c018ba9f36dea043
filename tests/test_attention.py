"""The attention core (moetrain.model.attention): FlexAttention with block masks against the dense SDPA reference.

On CPU the flex backend runs FlexAttention's eager reference (every pair scored, the mask_mod applied to each), so
the tile tables of a BlockMask, which only the fused CUDA kernel reads, are checked separately against the dense
mask: every allowed pair lies in a listed tile, every tile listed as full holds only allowed pairs, and no tile is
listed that holds none.
"""

import copy
import math

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_model, small_config, small_job
from moetrain.config import ConfigError
from moetrain.data.loader import document_positions
from moetrain.host_syncs import HostSyncCounter
from moetrain.model import ModelConfig, RopeConfig
from moetrain.model.attention import (BLOCK, attend, attention_mask, block_mask, describe_backend,
                                      document_causal_mask, resolve_backend)
from moetrain.model.rope import softmax_scale

CPU = torch.device("cpu")


def _doc_ids(T: int, *boundaries_per_row: list[int]) -> torch.Tensor:
    """[B, T] document ids of packed rows; each row's list holds the positions where a new document starts."""
    ids = torch.zeros(len(boundaries_per_row), T, dtype=torch.long)
    for row, starts in enumerate(boundaries_per_row):
        for s in starts:
            ids[row, s:] += 1
    return ids


# Rows of several documents, boundaries off the 128-token tiles (and one on it), and a row of one document.
LAYOUTS = {
    77: _doc_ids(77, [10, 50], [3, 4, 40, 76], []),
    200: _doc_ids(200, [30, 180], [5, 64, 127, 129, 190], []),
    300: _doc_ids(300, [128, 131, 299], [20, 260], []),
    520: _doc_ids(520, [1, 300], [100, 200, 256, 400], []),
}


def _v3_scale() -> float:
    """MLA's softmax scale at DeepSeek-V3's head dims and YaRN settings (mscale included)."""
    cfg = ModelConfig(rope=RopeConfig(scaling="yarn", factor=40, mscale=1.0, mscale_all_dim=1.0))
    scale = softmax_scale(cfg)
    assert scale != pytest.approx(192 ** -0.5)  # the YaRN correction is in
    return scale


@pytest.mark.parametrize("T", [77, 200, 300])
@pytest.mark.parametrize("documents", [False, True])
def test_flex_equals_dense_sdpa_forward_and_backward(T, documents):
    torch.manual_seed(T)
    B, H, K, V = 3, 2, 192, 128  # MLA's head dims: q/k 128 + 64 rotary, v 128
    doc_ids = LAYOUTS[T] if documents else None
    scale = _v3_scale()
    q, k = torch.randn(B, H, T, K), torch.randn(B, H, T, K)
    v, grad_out = torch.randn(B, H, T, V), torch.randn(B, H, T, V)

    outs, grads = [], []
    for backend in ("sdpa", "flex"):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        mask = attention_mask(backend, doc_ids, T, CPU)
        assert isinstance(mask, BlockMask) == (backend == "flex")
        out = attend(*qkv, mask, scale)
        out.backward(grad_out)
        outs.append(out.detach())
        grads.append([t.grad for t in qkv])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for name, g_flex, g_ref in zip("qkv", grads[1], grads[0]):
        torch.testing.assert_close(g_flex, g_ref, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def _tiles(counts_BHN: torch.Tensor, indices_BHNN: torch.Tensor) -> set[tuple[int, int, int]]:
    """The (row, query tile, key tile) triples a BlockMask's table lists (head 0: shared by all heads)."""
    return {(b, i, int(indices_BHNN[b, 0, i, n])) for b in range(counts_BHN.shape[0])
            for i in range(counts_BHN.shape[2]) for n in range(int(counts_BHN[b, 0, i]))}


@pytest.mark.parametrize("T", sorted(LAYOUTS))
@pytest.mark.parametrize("documents", [False, True])
def test_block_mask_tiles_match_the_dense_mask(T, documents):
    doc_ids = LAYOUTS[T] if documents else torch.zeros(1, T, dtype=torch.long)
    dense = document_causal_mask(doc_ids)[:, 0]  # [B, T, T], the reference
    bm = block_mask(doc_ids if documents else None, T, CPU)
    partial = _tiles(bm.kv_num_blocks, bm.kv_indices)
    full = _tiles(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not partial & full
    n = math.ceil(T / BLOCK)
    for b in range(dense.shape[0]):
        for i in range(n):
            for j in range(n):
                pairs = dense[b, i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]  # in-range pairs only
                where = (b, i, j)
                if pairs.all():
                    assert where in full, where  # the kernel skips the mask on it
                elif pairs.any():
                    assert where in partial, where  # the kernel applies the mask on it
                else:
                    assert where not in partial | full, where  # skipped
    # The mask_mod the partial tiles apply is the dense mask itself.
    assert torch.equal(bm.mask_mod(torch.arange(dense.shape[0])[:, None, None], 0, torch.arange(T)[None, :, None],
                                   torch.arange(T)[None, None, :]), dense)


def test_block_mask_of_several_documents_skips_tiles():
    T = 1024  # 8 tiles: causal attention lists 8 * 9 / 2 = 36 of them per row
    docs = _doc_ids(T, [100, 300, 450, 700, 1000])
    causal, packed = block_mask(None, T, CPU), block_mask(docs, T, CPU)
    n_causal = int(causal.kv_num_blocks.sum() + causal.full_kv_num_blocks.sum())
    n_packed = int(packed.kv_num_blocks.sum() + packed.full_kv_num_blocks.sum())
    assert n_causal == 36
    assert n_packed < n_causal
    assert int(packed.full_kv_num_blocks.sum()) < int(causal.full_kv_num_blocks.sum())


def test_block_mask_follows_the_loaders_document_ids():
    """The tile summaries assume document ids never decrease along a row: the loader numbers them that way."""
    eos = 7
    tokens = torch.randint(0, 7, (4, 333))
    tokens[0, [5, 128, 200]] = eos
    tokens[1, [127, 255, 332]] = eos
    doc_ids, _ = document_positions(tokens, eos)
    assert (doc_ids.diff(dim=1) >= 0).all()
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 2, 333, 24), torch.randn(4, 2, 333, 24), torch.randn(4, 2, 333, 16)
    torch.testing.assert_close(attend(q, k, v, block_mask(doc_ids, 333, CPU), 0.2),
                               attend(q, k, v, document_causal_mask(doc_ids), 0.2), rtol=1e-5, atol=1e-5)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("documents", [False, True])
def test_flex_mask_builds_no_T_by_T_tensor_and_reads_no_device_value(documents):
    """What the model builds per micro-batch under the flex backend (on CUDA as here) stays O(B T + B N^2), and
    the GPU never waits for the host over it."""
    B, T = 2, 4096
    doc_ids = _doc_ids(T, [1000, 2500], [7, 4000]) if documents else None
    with _LargestOutput() as seen, HostSyncCounter() as syncs:
        mask = attention_mask("flex", doc_ids, T, CPU)
    assert isinstance(mask, BlockMask)
    n = T // BLOCK
    assert seen.largest <= max(B * T, B * n * n) < T * T
    assert syncs.total == 0, syncs.by_op


def _model_loss_and_grads(cfg: ModelConfig, tokens, doc_ids, positions, recompute: bool):
    model = make_model(cfg, seed=1)
    for block in [*model.layers.values(), *(m.block for m in model.mtp.values())]:
        block.attn.recompute_up_proj = recompute
    out = model(tokens, tokens.roll(-1, 1), doc_ids, positions)
    loss = out.loss(int(out.n_tokens), 0.3)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [False, True])
def test_model_with_document_masks_same_loss_and_gradients_under_both_backends(recompute):
    torch.manual_seed(0)
    T = 150  # two tiles: the second row's documents cross the tile boundary
    cfg = small_config()
    cfg.max_seq_len = 160
    tokens = torch.randint(0, cfg.vocab_size, (2, T))
    doc_ids = _doc_ids(T, [40, 100], [3, 127, 140])
    positions = torch.arange(T) - torch.stack([torch.searchsorted(doc_ids[r], doc_ids[r], right=False)
                                               for r in range(2)])
    results = {}
    for backend in ("sdpa", "flex"):
        c = copy.deepcopy(cfg)
        c.attn.backend = backend
        results[backend] = _model_loss_and_grads(c, tokens, doc_ids, positions, recompute)
    (loss_ref, grads_ref), (loss, grads) = results["sdpa"], results["flex"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_backend_choice_and_startup_line():
    assert resolve_backend("auto", CPU) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("flex", CPU) == "flex"
    cfg = small_config()
    assert describe_backend(cfg, CPU, torch.float32, 64, True).startswith("sdpa, cpu")
    cfg.attn.backend = "flex"
    assert describe_backend(cfg, CPU, torch.float32, 64, True).startswith("flex (FlexAttention, eager reference")


def test_bad_backend_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        small_job(tmp_path, "model.attn.backend=flash")
    assert e.value.key == "model.attn.backend" and "auto, sdpa or flex" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_on_cuda_matches_sdpa_and_keeps_no_scores(dtype):
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    B, H, T, K, V = 2, 4, 8192, 192, 128
    doc_ids = _doc_ids(T, [100, 1000, 5900], [700]).to(cuda)
    q, k = (torch.randn(B, H, T, K, device=cuda, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, V, device=cuda, dtype=dtype)

    def run(mask):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*qkv, mask() if callable(mask) else mask, 0.1)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in qkv]

    run(lambda: attention_mask("auto", doc_ids, T, cuda))  # compiles
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, grads = run(lambda: attention_mask("auto", doc_ids, T, cuda))
    torch.cuda.synchronize()
    # q, k, v, their gradients and the output take ~0.2 GB here; one byte per score would be 0.5 GB.
    assert torch.cuda.max_memory_allocated() - before < B * H * T * T
    ref, ref_grads = run(document_causal_mask(doc_ids))
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, g_ref, **tol, msg=f"d{name}")
