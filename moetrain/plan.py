"""Parameter and FLOP counts of a model config, and the peak-FLOPs table MFU is measured against.

Training FLOPs per token (the convention of the PaLM / Megatron MFU papers, adapted to MLA and MoE):
``6 * N_active + 3 * (attention score and value FLOPs)``, where N_active counts the matmul weights one token
passes through (attention projections, the dense FFN or the router, the shared and top-k routed experts, the
output head, and the MTP modules; not the embedding lookup), and causal attention costs per layer and token
``2 * H * (T / 2) * (qk_head_dim + v_head_dim)`` forward.
"""

from __future__ import annotations

from moetrain.model.config import ModelConfig

# Dense bf16 peak TFLOP/s per device (datasheet, without sparsity); matched as a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.0}
# Memory per device in GB (datasheet; the 80 GB parts of A100/A800).
GPU_MEMORY_GB = {"H200": 141.0, "H100": 80.0, "H800": 80.0, "H20": 96.0, "A100": 80.0, "A800": 80.0,
                 "B200": 180.0, "GB200": 186.0, "L40S": 48.0, "A10G": 24.0, "RTX 4090": 24.0}


def _attention_params(cfg: ModelConfig) -> int:
    a, D = cfg.attn, cfg.dim
    q = D * a.n_heads * a.qk_head_dim if a.q_lora_rank == 0 else D * a.q_lora_rank + a.q_lora_rank * a.n_heads * a.qk_head_dim
    kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.n_heads * a.v_head_dim * D


def _ffn_active_params(cfg: ModelConfig, layer: int) -> int:
    m, D = cfg.moe, cfg.dim
    if layer < m.first_k_dense_replace:
        return 3 * D * cfg.inter_dim
    return D * m.n_routed_experts + 3 * D * m.moe_inter_dim * (m.router.topk + m.n_shared_experts)


def _ffn_params(cfg: ModelConfig, layer: int) -> int:
    m, D = cfg.moe, cfg.dim
    if layer < m.first_k_dense_replace:
        return 3 * D * cfg.inter_dim
    return D * m.n_routed_experts + 3 * D * m.moe_inter_dim * (m.n_routed_experts + m.n_shared_experts)


def _norm_params(cfg: ModelConfig) -> int:
    """RMSNorm weights of one block: attn_norm, ffn_norm, MLA's kv_norm (and q_norm)."""
    return 2 * cfg.dim + cfg.attn.kv_lora_rank + cfg.attn.q_lora_rank


def block_params(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(parameters outside the routed experts, routed-expert parameters) of block ``layer`` (MTP blocks follow
    the main ones: ``n_layers + k``)."""
    m, D = cfg.moe, cfg.dim
    routed = 0 if layer < m.first_k_dense_replace else 3 * D * m.moe_inter_dim * m.n_routed_experts
    return _attention_params(cfg) + _norm_params(cfg) + _ffn_params(cfg, layer) - routed, routed


def mtp_module_params(cfg: ModelConfig, depth: int) -> tuple[int, int]:
    """(outside routed experts, routed) of MTP module ``depth`` (1-based): enorm, hnorm, eh_proj, its block, its
    norm; the embedding and head are the main model's."""
    dense, routed = block_params(cfg, cfg.n_layers + depth - 1)
    return dense + 3 * cfg.dim + 2 * cfg.dim * cfg.dim, routed


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters as the V3 report counts them: ``total`` of the main model (embedding, blocks, final norm, head),
    ``mtp`` of the MTP modules without the shared embedding and head, ``active`` the matmul weights one token of
    the main model passes through (the head included, the embedding lookup not), ``routed`` the main model's
    routed experts'."""
    blocks = [block_params(cfg, i) for i in range(cfg.n_layers)]
    mtp = [mtp_module_params(cfg, k) for k in range(1, cfg.n_mtp_layers + 1)]
    total = sum(d + r for d, r in blocks) + 2 * cfg.vocab_size * cfg.dim + cfg.dim
    return {"total": total, "mtp": sum(d + r for d, r in mtp), "active": active_matmul_params(cfg, with_mtp=False),
            "routed": sum(r for _, r in blocks),
            "embedding": cfg.vocab_size * cfg.dim}


def pipeline_unit_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[tuple[float, int]], tuple[float, int],
                                                                 tuple[float, int]]:
    """(forward FLOPs per token, parameters) of each main block, of the first stage's extras (the embedding) and
    of the last stage's (final norm, head, MTP modules and their copy of the embedding): what :mod:`moetrain.parallel.pipeline_layout` balances."""
    a = cfg.attn
    attn_flops = 2 * a.n_heads * (seq_len / 2) * (a.qk_head_dim + a.v_head_dim)

    def block(layer: int) -> tuple[float, int]:
        active = _attention_params(cfg) + _ffn_active_params(cfg, layer)
        return 2.0 * active + attn_flops, _attention_params(cfg) + _ffn_params(cfg, layer)

    head = cfg.dim * cfg.vocab_size
    last_flops, last_params = 2.0 * head, head + (head if cfg.n_mtp_layers else 0)  # + MTP's embedding copy
    for k in range(cfg.n_mtp_layers):
        flops, params = block(cfg.n_layers + k)
        last_flops += flops + 2.0 * (2 * cfg.dim * cfg.dim + head)
        last_params += params + 2 * cfg.dim * cfg.dim
    return [block(i) for i in range(cfg.n_layers)], (0.0, cfg.vocab_size * cfg.dim), (last_flops, last_params)


def active_matmul_params(cfg: ModelConfig, with_mtp: bool = True) -> int:
    """Matmul weights a token passes through (see the module docstring)."""
    layers = list(range(cfg.n_layers))
    total = sum(_attention_params(cfg) + _ffn_active_params(cfg, i) for i in layers) + cfg.dim * cfg.vocab_size
    if with_mtp:
        for k in range(cfg.n_mtp_layers):
            total += 2 * cfg.dim * cfg.dim + _attention_params(cfg) + _ffn_active_params(cfg, cfg.n_layers + k)
            total += cfg.dim * cfg.vocab_size
    return total


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    a = cfg.attn
    n_attn = cfg.n_layers + cfg.n_mtp_layers
    attn_fwd = n_attn * 2 * a.n_heads * (seq_len / 2) * (a.qk_head_dim + a.v_head_dim)
    return 6.0 * active_matmul_params(cfg) + 3.0 * attn_fwd


def lookup_device(table: dict[str, float], device_name: str) -> float | None:
    """The entry of ``table`` whose key is in ``device_name`` (the longest such key: GB200 before B200)."""
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return table[key]
    return None


def peak_tflops(device_name: str) -> float | None:
    return lookup_device(PEAK_TFLOPS, device_name)
