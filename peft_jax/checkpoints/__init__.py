"""Pretrained-weight import: Google ``.npz``, timm, torchvision and Hugging Face checkpoints."""
from peft_jax.checkpoints.core import CheckpointError
from peft_jax.checkpoints.load import from_pretrained
from peft_jax.checkpoints.registry import KNOWN_CHECKPOINTS, KnownCheckpoint, cache_dir, fetch, resolve_checkpoint

__all__ = [
    "CheckpointError",
    "KNOWN_CHECKPOINTS",
    "KnownCheckpoint",
    "cache_dir",
    "fetch",
    "from_pretrained",
    "resolve_checkpoint",
]
