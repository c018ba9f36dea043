"""DeepSeek-V3-style model: MLA, DeepSeekMoE, aux-loss-free balancing, MTP. Knows nothing of processes or FP8."""

from moetrain.model.balance import collect_expert_counts, max_violation, pop_balance_loss, update_expert_bias
from moetrain.model.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig, RouterConfig
from moetrain.model.init import build_model, init_weights
from moetrain.model.transformer import IGNORE_INDEX, LMOutput, Transformer, lm_output, stage_lm_output

__all__ = [
    "ConfigError", "IGNORE_INDEX", "LMOutput", "MLAConfig", "ModelConfig", "MoEConfig", "RopeConfig", "RouterConfig",
    "Transformer", "build_model", "collect_expert_counts", "init_weights", "lm_output", "max_violation",
    "pop_balance_loss", "stage_lm_output", "update_expert_bias",
]
