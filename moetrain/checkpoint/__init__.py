"""Checkpoints: distributed save/load with completion markers, resume selection, Hugging Face conversion."""

from moetrain.checkpoint.manager import CheckpointError, CheckpointManager, resolve_checkpoint

__all__ = ["CheckpointError", "CheckpointManager", "resolve_checkpoint"]
