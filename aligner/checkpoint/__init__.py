"""Atomic, exactly resumable checkpoints of a training run (layout in :mod:`aligner.checkpoint.state`)."""

from aligner.checkpoint.layout import latest_checkpoint
from aligner.checkpoint.rng import get_rng_state, set_rng_state
from aligner.checkpoint.state import load_checkpoint, load_model_weights, save_checkpoint

__all__ = [
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "set_rng_state",
]
