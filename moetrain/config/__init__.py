"""The job config (``moetrain.config``): its schema (:mod:`.schema`), the checks that span groups
(:mod:`.checks`) and Hydra's composition (:mod:`.hydra`)."""

from moetrain.config.checks import check_layout, validate_job
from moetrain.config.hydra import (compose, overrides_name, register_configs, register_resolvers, to_job_config,
                                   world_size)
from moetrain.config.schema import (DP_STRATEGIES, FP8_PROVIDERS, FP8_RECIPES, ZERO_STAGES, CheckpointConfig,
                                    DataConfig, FP8Config, JobConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                    PlanConfig, PrecisionConfig, ProfileConfig, RunConfig, TensorBoardConfig,
                                    TrainConfig, WandbConfig)
from moetrain.model.config import ConfigError

__all__ = ["DP_STRATEGIES", "FP8_PROVIDERS", "FP8_RECIPES", "ZERO_STAGES", "CheckpointConfig", "ConfigError",
           "DataConfig", "FP8Config", "JobConfig", "LoggingConfig", "OptimConfig", "ParallelConfig", "PlanConfig",
           "PrecisionConfig", "ProfileConfig", "RunConfig", "TensorBoardConfig", "TrainConfig", "WandbConfig",
           "check_layout", "compose", "overrides_name", "register_configs", "register_resolvers", "to_job_config",
           "validate_job", "world_size"]
