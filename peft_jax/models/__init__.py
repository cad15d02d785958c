"""Plain NNX models, one file per architecture; ``registry`` names them, ``from_pretrained`` loads weights."""
from __future__ import annotations

from flax import nnx

from peft_jax.models.registry import (  # noqa: F401  (the public names of the registry)
    DIFFUSION_ARCHS, EFFICIENTNET_NAMES, FEATURE_ARCHS, MODEL_NAMES, RESNET_NAMES, create_model, efficientnet_config,
    unknown_name_error, vit_config,
)


def from_pretrained(arch: str, path, **kwargs) -> nnx.Module:
    """An NNX model of ``arch`` with the weights of a checkpoint file, directory or registered name (format
    detected): the entry point of DESIGN.md. The loaders live one layer up, in peft_jax.checkpoints (which
    imports ``peft_jax.models.registry``, never this function), and are imported on first use."""
    from peft_jax.checkpoints.load import from_pretrained as load

    return load(arch, path, **kwargs)
