"""Per-GPU memory of a training layout, from the model config alone: what ``moetrain plan`` adds up.

Activations are counted from what moetrain's own modules keep for backward (the tensors autograd saves, and the
inputs a recomputed region keeps), per token, so that a micro-batch of ``n`` tokens keeps ``n *`` that many bytes;
``benchmarks/recompute.py`` measures the same quantity (bytes allocated by the forward and still alive after it)
and ``tests/test_memory_model.py`` holds the two within 15% of each other. Assumptions, each a real limit:

- attention runs a fused kernel that keeps q, k, v, the output and a log-sum-exp (flash / memory-efficient SDPA,
  compiled FlexAttention), not the T x T probabilities (SDPA's math fallback, used on CPU with a document mask,
  and FlexAttention's CPU reference keep those);
- routed experts receive ``K`` copies of each token, balanced; under expert parallelism the received copies are
  the ones kept, the same count on average;
- ``a`` is the compute dtype's size (2 for bf16, 4 for fp32); RMSNorm statistics, the router and the loss stay
  fp32 whatever the compute dtype (as the model computes them). FP8 providers keep some GEMM inputs in one
  byte: counted as bf16 here, an upper bound.

Shapes in names: D model dim, H heads, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim,
Q q_lora_rank, E routed experts, K experts per token, F widths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moetrain.model.config import ModelConfig

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Activations:
    """How a forward runs, as far as what it keeps is concerned.

    a: bytes of the compute dtype; mode: ``train.recompute``; attention: ``fused`` (flash / memory-efficient SDPA,
    what GPUs run) or ``math`` (SDPA's fallback, what CPUs run when v_head_dim != qk_head_dim or with a mask:
    it keeps the T x T probabilities); seq_len: T; stage_logits: a pipeline's last stage returns every depth's
    logits, which the schedule keeps until backward; loss_chunk: ``train.loss_chunk_tokens``, the heads' loss
    computed that many tokens at a time, keeping no logits (0: the full logits), also on a pipeline's last stage
    (which then returns the loss sums, whatever stage_logits says).
    """

    a: int
    mode: str = "none"
    attention: str = "fused"
    seq_len: int = 4096
    stage_logits: bool = False
    loss_chunk: int = 0

    def __post_init__(self):
        if self.mode not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute: must be one of {RECOMPUTE_MODES}, got {self.mode!r}")


def _norm_kept(d: int, x: Activations) -> float:
    """An RMSNorm of width d: its fp32 input copy, the inverse RMS and the normalised value (the weight's gradient
    needs it); under selective recomputation only its input."""
    return x.a * d if x.mode == "selective" else 4 * d + 4 + x.a * d


def attention_bytes(cfg: ModelConfig, x: Activations) -> float:
    """MLA of one block, per token, with its pre-norm (``x.mode`` none or selective)."""
    at, a = cfg.attn, x.a
    D, H, C, R = cfg.dim, at.n_heads, at.kv_lora_rank, at.qk_rope_head_dim
    qk, N, V, Q = at.qk_head_dim, at.qk_nope_head_dim, at.v_head_dim, at.q_lora_rank
    total = _norm_kept(D, x) + a * D  # attn_norm, and its output (the input of wq_a / wq and wkv_a)
    if x.mode == "selective":
        # Kept: the latents the recomputed up-projections start from, and the attention output (wo's input).
        if Q:
            total += a * Q + a * Q  # wq_a's output (q_norm's input), q_norm's output
        return total + a * (C + R) + a * H * V
    if Q:
        total += _norm_kept(Q, x) + a * Q  # q_norm, and its output (wq_b's input)
    fp32_slice = 4 * R if a == 4 else 0  # fp32: kv_norm's input is a slice of the whole wkv_a output
    total += 4 * C + fp32_slice + 4 + a * C + a * C  # kv_norm (fp32 latent, stats, value), wkv_b's input
    if x.attention == "math":
        # In fp32 whatever the compute dtype: q and k (scaled copies), the softmax probabilities, v made
        # contiguous; then the output reshaped for wo.
        return total + 4 * (2 * H * qk + H * x.seq_len + H * V) + a * H * V
    # Fused: q and k (after RoPE and the concat), the whole wkv_b output (v is a view of it), the output (also
    # wo's input, no copy), the log-sum-exp.
    return total + a * (2 * H * qk + H * (N + V) + H * V) + 4 * H


def ffn_bytes(cfg: ModelConfig, layer: int, x: Activations) -> float:
    """The FFN of block ``layer`` with its pre-norm, per token: dense SwiGLU, or router + routed + shared experts."""
    D, m, a = cfg.dim, cfg.moe, x.a
    norm = _norm_kept(D, x)
    if layer < m.first_k_dense_replace:
        return norm + a * D + 4 * a * cfg.inter_dim  # w1/w3 input; w1 out, silu out, w3 out, product (w2 input)
    E, K, F, r = m.n_routed_experts, m.router.topk, m.moe_inter_dim, m.router
    S = m.n_shared_experts * F
    # ffn_norm's output: in fp32 the router's (and shared experts') input; in bf16 the router keeps an fp32 copy
    # and the shared experts the bf16 value.
    total = norm + (a * D if (a == 4 or S) else 0) + (4 * D if a != 4 else 0)
    total += 4 * E + 8 * K + 4 + 4 * K  # sigmoid/softmax scores, top-k ids, normaliser, gate weights
    if r.n_group > 1:
        total += 24 * r.n_group + 8 * r.topk_group  # group top-2 ids and scores' ids, the groups kept
    total += 8 * K + 8 * K  # sort order (dispatch gather, combine scatter)
    total += a * K * D + 4 * a * K * F  # routed copies; per copy w1 out, silu out, w3 out, product
    total += 2 * a * K * D + a * K  # combine: expert outputs put back in token order, gate weights
    total += 4 * a * S  # shared experts: w1 out, silu out, w3 out, product
    return total + (8 if r.balance_loss_alpha > 0 else 0)  # balance loss: score sums per token


def block_bytes(cfg: ModelConfig, layer: int, x: Activations) -> float:
    """What block ``layer`` keeps per token between its forward and its backward."""
    if x.mode == "full":
        return x.a * cfg.dim  # its input; the whole block runs again in backward
    return attention_bytes(cfg, x) + ffn_bytes(cfg, layer, x)


def _no_full(x: Activations) -> Activations:
    """Full recomputation covers blocks only: what sits outside them is kept as without recomputation."""
    return replace(x, mode="none") if x.mode == "full" else x


def _loss_kept(cfg: ModelConfig, x: Activations) -> float:
    """What one head's loss keeps per token beyond the head's input and the labels: the logits (the main head's
    output keeps them) and the fp32 log-softmax; chunked (moetrain.model.loss), one fp32 log-sum-exp."""
    return 4 if x.loss_chunk else (x.a + 4) * cfg.vocab_size


def head_bytes(cfg: ModelConfig, x: Activations) -> float:
    """Final norm, output head and loss of the main model, per token: the norm, the head's input, the loss's
    logits and log-softmax (or log-sum-exp when chunked), the labels."""
    y = _no_full(x)
    return _norm_kept(cfg.dim, y) + y.a * cfg.dim + _loss_kept(cfg, y) + 8


def mtp_bytes(cfg: ModelConfig, depth: int, x: Activations) -> float:
    """MTP module ``depth`` (1-based), per token: the two input norms (hnorm's input is the head's), eh_proj's input,
    its block, its norm and head input, the fp32 log-softmax (chunked: log-sum-exp), shifted tokens and labels."""
    D, y = cfg.dim, _no_full(x)
    if y.mode == "selective":
        norms = y.a * D  # enorm keeps the embedding; hnorm's input is already kept as the head's input
    else:
        norms = _norm_kept(D, y) + (4 * D if y.a != 4 else 0) + 4 + y.a * D
    own = norms + 2 * y.a * D + block_bytes(cfg, cfg.n_layers + depth - 1, x)
    if x.loss_chunk:  # chunked: the logits never exist whole, pipeline stage or not; one log-sum-exp
        logits = 4
    elif x.stage_logits:  # a pipeline stage returns the logits, which the schedule keeps
        logits = (y.a + 4) * cfg.vocab_size
    else:  # the logits die once the loss has its fp32 log-softmax
        logits = 4 * cfg.vocab_size
    return own + _norm_kept(D, y) + y.a * D + logits + 16


def loss_working_bytes(cfg: ModelConfig, tokens: int, x: Activations) -> float:
    """What one head's loss adds while it runs on a micro-batch of ``tokens`` tokens (its backward, the larger):
    the fp32 gradient of the logits; chunked, one chunk's logits in the compute dtype and in fp32 (one array when
    that is fp32), h's gradient accumulated in fp32 and h in the compute dtype."""
    V, D, a = cfg.vocab_size, cfg.dim, x.a
    if not x.loss_chunk:
        return tokens * 4 * V
    per_logit = 4 if a == 4 else a + 4
    return min(x.loss_chunk, tokens) * V * per_logit + tokens * D * (4 if a == 4 else 4 + a)


def activation_bytes_per_token(cfg: ModelConfig, layers: list[int], x: Activations, first: bool = True,
                               last: bool = True) -> float:
    """Bytes kept per token of a micro-batch by blocks ``layers`` (plus the embedding's token ids on the first
    stage, the head and MTP modules on the last) between forward and backward."""
    total = sum(block_bytes(cfg, i, x) for i in layers) + (8 if first else 0)
    if last:
        total += head_bytes(cfg, x) + sum(mtp_bytes(cfg, k, x) for k in range(1, cfg.n_mtp_layers + 1))
    return total


def recompute_working_bytes(cfg: ModelConfig, layers: list[int], x: Activations) -> float:
    """Per token, what backward adds on top while it recomputes: one block's activations (full), one block's
    up-projections and attention (selective), nothing (none)."""
    if x.mode == "none" or not layers:
        return 0.0
    if x.mode == "full":
        return max(block_bytes(cfg, i, replace(x, mode="none")) for i in layers)
    return attention_bytes(cfg, replace(x, mode="none")) - attention_bytes(cfg, x)


@dataclass(frozen=True)
class StateBytes:
    """Per-GPU bytes of model state: parameters (what forward reads), gradients, optimizer (fp32 master + Adam)."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def state_bytes(dense: float, experts: float, unit: float, *, strategy: str, zero_stage: int, offload: bool,
                dp: int, edp: int, a: int, pp: int) -> StateBytes:
    """Model state of one GPU holding ``dense`` replicated-layout parameters and ``experts`` of its own experts
    (already divided by ep), sharded over ``dp`` and ``edp`` (expert data parallel) by the strategy:

    - fsdp (FSDP2, moetrain's default): fp32 master weights, fp32 gradients and Adam's two moments sharded; forward
      gathers parameters in the compute dtype one unit (block) at a time, two in flight with prefetch (``unit``:
      the largest unit's local parameters). Inside pipeline stages torch's schedule keeps the whole stage gathered
      for the step and accumulates unsharded fp32 gradients until the last micro-batch's backward reduces them.
    - ddp: everything replicated: fp32 weights, gradients, Adam.
    - deepspeed: the ZeRO paper's accounting, K = 12 bytes of optimizer state per parameter (fp32 master and two
      moments) under bf16, 8 under fp32 (no master copy); stage 1 shards those, stage 2 gradients too;
      ``offload`` moves optimizer state (and the master copy) to CPU memory.
    """
    shard = dense / dp + experts / edp
    full = dense + experts
    if strategy == "fsdp":
        gathered = a * (full if pp > 1 else 2 * unit)
        return StateBytes(weights=4 * shard + gathered, gradients=4 * shard + (4 * full if pp > 1 else a * unit),
                          optimizer=8 * shard)
    if strategy == "ddp":
        return StateBytes(weights=4 * full, gradients=4 * full, optimizer=8 * full)
    if strategy == "deepspeed":
        k = 12 if a == 2 else 8
        grads = a * (shard if zero_stage >= 2 else full)
        return StateBytes(weights=a * full, gradients=grads, optimizer=0.0 if offload else k * shard)
    raise ValueError(f"parallel.dp_strategy: unknown strategy {strategy!r}")


def in_flight_microbatches(schedule: str, pp: int, n_stages: int, stage: int, m: int) -> float:
    """Micro-batches whose activations pipeline stage ``stage`` (of ``n_stages``) holds at once.

    GPipe: all m. 1F1B, and each stage of the V-shaped schedules: the forwards a stage runs before its first
    backward, ``n_stages - stage`` (PipeDream-Flush; over a V this gives rank r ``2 pp + 1`` stage-micro-batches in
    all, 1F1B's ``pp`` micro-batches of a whole rank, as the ZB-V paper states), DualPipeV one more (DeepSeek-V3's
    ``pp + 1``). Interleaved1F1B: Megatron's warm-up of ``2 (pp - r - 1) + (v - 1) pp + 1`` chunk-forwards on
    rank r, spread over the rank's v stages. Never more than m.
    """
    if pp == 1:
        return 1.0
    if schedule == "GPipe":
        return float(m)
    if schedule in ("1F1B", "ZBVZeroBubble", "DualPipeV"):
        return float(min(m, n_stages - stage + (schedule == "DualPipeV")))
    if schedule == "Interleaved1F1B":
        v, r = n_stages // pp, stage % pp
        return min(m * v, 2 * (pp - r - 1) + (v - 1) * pp + 1) / v
    raise ValueError(f"parallel.pp_schedule: unknown schedule {schedule!r}")
