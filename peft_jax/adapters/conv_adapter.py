"""Conv-Adapter (Chen et al., "Conv-Adapter: Exploring Parameter Efficient Transfer Learning
for ConvNets", 2022), in the convolution-parallel placement of the reference implementation.

Each residual block gets one adapter beside its first 3x3 convolution (the 3x3 of a
bottleneck, the first 3x3 of a basic block), reading the same input and adding to its
output:

    k x k depth-wise convolution (base's stride and padding), C_in -> C_in / gamma channels,
    groups C_in / gamma  ->  ReLU  ->  1x1 convolution to C_out  ->  times a per-channel scale

``gamma`` is ``peft.reduction`` (8, the reference's default). As in the reference, both
convolutions have biases and start from the ResNet's He initialisation (normal, fan-out),
biases at zero and the scale at one, so the adapter contributes from the first step. The
ReLU makes it non-linear: it does not merge.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import Geometry, block_convs
from peft_jax.adapters.core import AdapterParam, Method, Path, adapter_variables, path_str, register, replace_module

_he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvAdapter(nnx.Module):
    """``base(x) + scale * up(relu(down(x)))`` with a grouped k x k ``down`` and a 1x1 ``up``."""

    def __init__(self, base: nnx.Conv, reduction: int, *, rngs: nnx.Rngs, path: Path):
        kh, kw, cin, cout = base.kernel.shape
        if reduction < 1 or cin % reduction:
            raise ValueError(f"conv_adapter: peft.reduction={reduction} must divide the {cin} input channels of "
                             f"{path_str(path)}")
        hidden = cin // reduction
        self.base = base
        self.geometry = Geometry.of(base, "conv_adapter", path)
        self.groups = hidden  # each group maps `reduction` input channels to one hidden channel
        self.down_kernel = AdapterParam(_he_fan_out(rngs.params(), (kh, kw, reduction, hidden)))
        self.down_bias = AdapterParam(jnp.zeros((hidden,), jnp.float32))
        self.up_kernel = AdapterParam(_he_fan_out(rngs.params(), (1, 1, hidden, cout))[0, 0])
        self.up_bias = AdapterParam(jnp.zeros((cout,), jnp.float32))
        self.adapter_scale = AdapterParam(jnp.ones((cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = self.geometry.conv(x, self.down_kernel[...], groups=self.groups) + self.down_bias[...].astype(dtype)
        h = nnx.relu(h) @ self.up_kernel[...].astype(dtype) + self.up_bias[...].astype(dtype)
        return self.base(x) + h * self.adapter_scale[...].astype(dtype)


def conv_adapter_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    reduction = int(cfg.get("reduction") or 8)
    first_per_block: dict[Path, tuple[Path, nnx.Conv]] = {}
    for path, conv in block_convs(model, 3):
        first_per_block.setdefault(path[:2], (path, conv))  # path[:2] is the block, e.g. ("layer1", 0)
    if not first_per_block:
        raise ValueError("conv_adapter: the model has no 3x3 convolution in residual blocks (layer1..4)")
    for path, conv in first_per_block.values():
        replace_module(model, path, ConvAdapter(conv, reduction, rngs=rngs, path=path))


register(Method(
    name="conv_adapter",
    doc="Conv-Adapter (Chen et al. 2022): a depth-wise separable bottleneck (C/peft.reduction channels) beside the "
        "first 3x3 convolution of every residual block, with a per-channel scale.",
    trainable=lambda cfg: adapter_variables,
    surgery=conv_adapter_surgery,
    archs=("resnet",),
))
