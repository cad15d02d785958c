"""Partial fine-tuning: the last ``peft.num_blocks`` residual blocks train (and the head).

On EfficientNet the head convolution and its BatchNorm (``conv_head``, ``bn1``) lie between
the last block and the pooled feature; they train whenever a block does, so the trained part
is always the top of the network (``cnn.CNNLayout.top``).

Which blocks are last depends on the depth (ResNet-50's layer4 has 3 blocks, ResNet-101's
layer3 has 23), which a path regex built from the config alone cannot know. So the surgery
marks the chosen blocks' parameters with a metadata flag, and the trainable filter selects
the marked variables: no module or variable changes type or path.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import cnn_layout, outermost, residual_blocks
from peft_jax.adapters.core import Method, Path, modules_matching, register
from peft_jax.errors import UserError

MARK = "peft_tune"


def partial_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del rngs
    blocks = [block for _, block in residual_blocks(model)]
    n = int(cfg.get("num_blocks", 1))
    if not 0 <= n <= len(blocks):
        raise UserError(f"peft.num_blocks must be between 0 and the model's {len(blocks)} residual blocks, got {n}")
    top = cnn_layout(model).top
    above = [m for _, m in outermost(modules_matching(model, (nnx.Module,), top))] if top and n else []
    for block in blocks[len(blocks) - n:] + above:
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
    doc="Partial fine-tuning: every parameter of the last peft.num_blocks residual blocks (and of any layer above "
        "them, as EfficientNet's head convolution), and the head.",
    trainable=lambda cfg: marked,
    surgery=partial_surgery,
    merge=unmark,
    archs=("cnn",),
))
