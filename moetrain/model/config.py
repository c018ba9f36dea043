"""Config dataclasses of the model, one per component, with the paper's and Hugging Face's names.

Every dataclass has ``validate(prefix)``, which raises :class:`ConfigError` naming the full key to change
(``model.moe.router.topk_group``), so a bad config fails when it is composed, never first inside ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A user-facing config error; the message starts with the key to change."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclass
class RopeConfig:
    """Rotary embedding of the decoupled key/query part; ``scaling=yarn`` enables YaRN (V3: factor 40)."""

    rope_theta: float = 10000.0
    scaling: str = "none"  # none | yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def validate(self, prefix: str = "model.rope") -> None:
        require(self.scaling in ("none", "yarn"), f"{prefix}.scaling", f"must be none or yarn, got {self.scaling!r}")
        require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")
        if self.scaling == "yarn":
            require(self.factor >= 1.0, f"{prefix}.factor", f"YaRN factor must be >= 1, got {self.factor}")
            require(self.original_max_position_embeddings > 0, f"{prefix}.original_max_position_embeddings",
                     "must be positive")
            require(self.beta_fast > self.beta_slow > 0, f"{prefix}.beta_fast",
                     f"need beta_fast > beta_slow > 0, got {self.beta_fast}, {self.beta_slow}")


@dataclass
class MLAConfig:
    """Multi-head Latent Attention. ``q_lora_rank=0`` means no query compression (a plain ``wq``)."""

    n_heads: int = 16
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # The attention core (moetrain.model.attention): auto (flex on CUDA, sdpa elsewhere) | sdpa | flex.
    backend: str = "auto"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, prefix: str = "model.attn") -> None:
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            require(getattr(self, name) > 0, f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        require(self.q_lora_rank >= 0, f"{prefix}.q_lora_rank", "must be >= 0 (0 = no query compression)")
        require(self.backend in ("auto", "sdpa", "flex"), f"{prefix}.backend",
                f"must be auto, sdpa or flex, got {self.backend!r}")
        require(self.qk_rope_head_dim % 2 == 0, f"{prefix}.qk_rope_head_dim",
                 f"rotary dims come in pairs, got odd {self.qk_rope_head_dim}")


@dataclass
class RouterConfig:
    """Top-k router of DeepSeekMoE (V3: sigmoid scores, selection bias, 8 groups keep 4, top-8)."""

    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    topk: int = 8  # num_experts_per_tok
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Aux-loss-free balancing: a per-expert bias added to the scores for the choice only (e_score_correction_bias).
    selection_bias: bool = True
    # Sequence-wise balance loss coefficient alpha (V3: 1e-4); 0 disables it.
    balance_loss_alpha: float = 0.0001

    def validate(self, n_routed_experts: int, prefix: str = "model.moe.router") -> None:
        require(self.scoring_func in ("sigmoid", "softmax"), f"{prefix}.scoring_func",
                 f"must be sigmoid or softmax, got {self.scoring_func!r}")
        require(self.n_group >= 1, f"{prefix}.n_group", "must be >= 1")
        require(n_routed_experts % self.n_group == 0, f"{prefix}.n_group",
                 f"n_routed_experts={n_routed_experts} is not divisible by n_group={self.n_group}")
        require(1 <= self.topk_group <= self.n_group, f"{prefix}.topk_group",
                 f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
        per_group = n_routed_experts // self.n_group
        require(1 <= self.topk <= self.topk_group * per_group, f"{prefix}.topk",
                 f"must be in [1, topk_group * experts per group = {self.topk_group * per_group}], got {self.topk}")
        if self.n_group > 1 and self.selection_bias:
            require(per_group >= 2, f"{prefix}.n_group", "a group is scored by its top-2 experts: need >= 2 per group")
        require(self.routed_scaling_factor > 0, f"{prefix}.routed_scaling_factor", "must be positive")
        require(self.balance_loss_alpha >= 0, f"{prefix}.balance_loss_alpha", "must be >= 0")


@dataclass
class MoEConfig:
    """DeepSeekMoE: shared experts plus fine-grained routed experts; the first layers stay dense."""

    n_routed_experts: int = 64
    n_shared_experts: int = 2
    moe_inter_dim: int = 1408
    first_k_dense_replace: int = 1
    # Run the routed experts through torch._grouped_mm where it can (dtype, alignment); else a per-expert loop.
    grouped_mm: bool = True
    router: RouterConfig = field(default_factory=RouterConfig)

    def validate(self, n_layers: int, prefix: str = "model.moe") -> None:
        require(self.n_routed_experts >= 1, f"{prefix}.n_routed_experts", "must be >= 1")
        require(self.n_shared_experts >= 0, f"{prefix}.n_shared_experts", "must be >= 0")
        require(self.moe_inter_dim > 0, f"{prefix}.moe_inter_dim", "must be positive")
        require(0 <= self.first_k_dense_replace <= n_layers, f"{prefix}.first_k_dense_replace",
                 f"must be in [0, n_layers={n_layers}]")
        self.router.validate(self.n_routed_experts, f"{prefix}.router")


@dataclass
class ModelConfig:
    """A DeepSeek-V3-style decoder: embedding, n_layers blocks, norm, head, n_mtp_layers MTP modules."""

    vocab_size: int = 32000
    dim: int = 2048
    inter_dim: int = 10944  # dense FFN width of the first_k_dense_replace layers
    n_layers: int = 27
    n_mtp_layers: int = 0  # MTP depth D
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    init_std: float = 0.006
    attn: MLAConfig = field(default_factory=MLAConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self, prefix: str = "model") -> "ModelConfig":
        for name in ("vocab_size", "dim", "inter_dim", "n_layers", "max_seq_len"):
            require(getattr(self, name) > 0, f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
        require(self.n_mtp_layers >= 0, f"{prefix}.n_mtp_layers", "must be >= 0")
        require(self.init_std > 0, f"{prefix}.init_std", "must be positive")
        require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
        self.attn.validate(f"{prefix}.attn")
        self.rope.validate(f"{prefix}.rope")
        self.moe.validate(self.n_layers, f"{prefix}.moe")
        return self
