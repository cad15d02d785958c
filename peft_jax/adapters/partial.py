"""Partial fine-tuning: the last ``peft.num_blocks`` residual blocks train (and the head).

Which blocks are last depends on the depth (ResNet-50's layer4 has 3 blocks, ResNet-101's
layer3 has 23), which a path regex built from the config alone cannot know. So the surgery
marks the chosen blocks' parameters with a metadata flag, and the trainable filter selects
the marked variables: no module or variable changes type or path.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from peft_jax.adapters.core import Method, Path, register

MARK = "peft_tune"
STAGES = ("layer1", "layer2", "layer3", "layer4")


def residual_blocks(model: nnx.Module) -> list[nnx.Module]:
    """The residual blocks in forward order."""
    return [block for stage in STAGES for block in getattr(model, stage)]


def partial_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del rngs
    blocks = residual_blocks(model)
    n = int(cfg.get("num_blocks", 1))
    if not 0 <= n <= len(blocks):
        raise ValueError(f"peft.num_blocks must be between 0 and the model's {len(blocks)} residual blocks, got {n}")
    for block in blocks[len(blocks) - n:]:
        for _, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
            var.set_metadata(MARK, True)


def unmark(model: nnx.Module) -> None:
    """``merge``: the tuned weights are ordinary weights already; only the marks go."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.has_metadata(MARK):
            var.del_metadata(MARK)


def marked(path: Path, value: Any) -> bool:
    """Filter: parameters the surgery marked as trainable."""
    del path
    return isinstance(value, nnx.Param) and bool(value.get_metadata().get(MARK, False))


register(Method(
    name="partial",
    doc="Partial fine-tuning: every parameter of the last peft.num_blocks residual blocks, and the head.",
    trainable=lambda cfg: marked,
    surgery=partial_surgery,
    merge=unmark,
    archs=("resnet",),
))
