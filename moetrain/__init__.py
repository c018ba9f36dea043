"""moetrain: pretraining DeepSeek-V3-style Mixture-of-Experts models."""

__version__ = "0.1.0"
