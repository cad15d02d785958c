"""Conv-Adapter (Chen et al., "Conv-Adapter: Exploring Parameter Efficient Transfer Learning
for ConvNets", 2022), placed as in the reference implementation (Hhhhhhao/Conv-Adapter,
``models/backbones/resnet.py`` and ``models/__init__.py``).

One adapter per residual block:

    k x k grouped convolution (the 3x3's stride and padding), C_in -> C_in / gamma channels,
    groups C_in / gamma  ->  ReLU  ->  1x1 convolution to C_out  ->  times a per-channel scale

- **Bottleneck** (ResNet-50/101): the adapter reads the input of the 3x3 convolution
  (``relu(bn1(conv1(x)))``) and its output is added *after* ``relu(bn2(conv2(.)))``.
- **Basic block** (ResNet-18/34): beside the first 3x3 convolution, reading the block input
  and added to that convolution's output before ``bn1``. (The reference's basic-block forward
  reads a variable before assigning it and cannot run; this is its evident intent: an
  adapter with ``conv1``'s input, output and stride.)
- **Inverted residual** (EfficientNet-Lite; the reference's ``efficientnet_blocks.py``): the
  adapter sits beside the whole MBConv block: it reads the block input with a grouped 1x1
  convolution (the expansion's kernel size) at the block's stride, uses the block's ReLU6, and
  is added to the block output after the residual sum. The first block (expansion 1, the
  reference's ``DepthwiseSeparableConv``) has none, as in the reference. Initialisation
  follows the reference's EfficientNet (timm's TensorFlow-style fan-out divided by the groups:
  the grouped 1x1 draws with std sqrt(2)).
- **Pre-pool BatchNorm**: the reference's ResNet has a fresh BatchNorm on the last feature map
  before pooling, which trains with the adapters and the head; its EfficientNet has none.

``gamma`` is ``peft.reduction`` (8, the reference's default). As in the reference, both
convolutions have biases and start from the ResNet's He initialisation (normal, fan-out),
biases at zero and the scale at one, so the adapter contributes from the first step. The
ReLU makes it non-linear: it does not merge.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import Geometry, block_convs, residual_blocks, wrap_pool
from peft_jax.adapters.core import (
    AdapterParam, Method, Path, adapter_variables, any_of, path_regex, path_str, register, replace_module,
)
from peft_jax.errors import UserError
from peft_jax.models import efficientnet as effnet_lib
from peft_jax.models import resnet as resnet_lib

_he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# The pre-pool BatchNorm's affine parameters (other methods may wrap the pool around it).
PRE_POOL_NORM = r"^pool/(?:base/)*norm/(?:scale|bias)$"


class ConvAdapterBranch(nnx.Module):
    """``scale * up(act(down(x)))`` with a grouped k x k ``down`` (C_in -> C_in / gamma) and a 1x1 ``up`` to C_out.

    ``group_fan_out``: the down kernel's He fan-out is divided by its groups (timm's EfficientNet
    initialiser) instead of torchvision's k * k * out.
    """

    def __init__(self, shape: tuple[int, int, int, int], geometry: Geometry, reduction: int, *, rngs: nnx.Rngs,
                 path: Path, act: Callable[[jax.Array], jax.Array] = nnx.relu, group_fan_out: bool = False):
        kh, kw, cin, cout = shape
        if reduction < 1 or cin % reduction:
            raise UserError(f"conv_adapter: peft.reduction={reduction} must divide the {cin} input channels of "
                             f"{path_str(path)}")
        hidden = cin // reduction
        self.geometry = geometry
        self.act = act
        self.groups = hidden  # each group maps `reduction` input channels to one hidden channel
        down = _he_fan_out(rngs.params(), (kh, kw, reduction, hidden))  # std sqrt(2 / (k * k * hidden))
        self.down_kernel = AdapterParam(down * math.sqrt(hidden) if group_fan_out else down)
        self.down_bias = AdapterParam(jnp.zeros((hidden,), jnp.float32))
        self.up_kernel = AdapterParam(_he_fan_out(rngs.params(), (1, 1, hidden, cout))[0, 0])
        self.up_bias = AdapterParam(jnp.zeros((cout,), jnp.float32))
        self.adapter_scale = AdapterParam(jnp.ones((cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = self.geometry.conv(x, self.down_kernel[...], groups=self.groups) + self.down_bias[...].astype(dtype)
        h = self.act(h) @ self.up_kernel[...].astype(dtype) + self.up_bias[...].astype(dtype)
        return h * self.adapter_scale[...].astype(dtype)


def branch_beside(conv: nnx.Conv, reduction: int, *, rngs: nnx.Rngs, path: Path) -> ConvAdapterBranch:
    """The ResNet branch: ``conv``'s kernel size, channels, stride and padding."""
    return ConvAdapterBranch(conv.kernel.shape, Geometry.of(conv, "conv_adapter", path), reduction, rngs=rngs,
                             path=path)


class ConvAdapter(nnx.Module):
    """``base(x) + adapter(x)``: the basic-block placement, beside a convolution."""

    def __init__(self, base: nnx.Conv, reduction: int, *, rngs: nnx.Rngs, path: Path):
        self.base = base
        self.adapter = branch_beside(base, reduction, rngs=rngs, path=path)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.adapter(x)


class ConvAdapterBottleneck(nnx.Module):
    """A bottleneck whose adapter reads the 3x3's input and adds to ``relu(bn2(conv2(.)))``."""

    def __init__(self, base: resnet_lib.Bottleneck, reduction: int, *, rngs: nnx.Rngs, path: Path):
        self.base = base
        self.adapter = branch_beside(base.conv2, reduction, rngs=rngs, path=path + ("conv2",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b = self.base  # the steps of resnet.Bottleneck.__call__, with the adapter after the middle ReLU
        y = nnx.relu(b.bn1(b.conv1(x)))
        y = nnx.relu(b.bn2(b.conv2(y))) + self.adapter(y)
        y = b.bn3(b.conv3(y))
        shortcut = x if b.downsample is None else b.downsample(x)
        return nnx.relu(y + shortcut)


class ConvAdapterMBConv(nnx.Module):
    """An inverted-residual block plus an adapter that reads its input and adds to its output (the reference's)."""

    def __init__(self, base: effnet_lib.MBConvBlock, reduction: int, *, rngs: nnx.Rngs, path: Path):
        cin, cout = base.expand_conv.in_features, base.project_conv.out_features
        geometry = Geometry(tuple(base.depthwise_conv.strides), "VALID", (1, 1))  # the expansion's 1x1, strided
        self.base = base
        self.adapter = ConvAdapterBranch((1, 1, cin, cout), geometry, reduction, rngs=rngs, path=path,
                                         act=nnx.relu6, group_fan_out=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.adapter(x)


class PrePoolNorm(nnx.Module):
    """``pool(norm(x))``: the reference's trained BatchNorm on the last feature map."""

    def __init__(self, base: nnx.Module, features: int, *, rngs: nnx.Rngs):
        self.base = base
        self.norm = resnet_lib.batch_norm(features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(self.norm(x))


def conv_adapter_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    reduction = int(cfg.get("reduction") or 8)
    blocks = residual_blocks(model)
    basic = {path for path, block in blocks if isinstance(block, resnet_lib.BasicBlock)}
    first_conv: dict[Path, tuple[Path, nnx.Conv]] = {}
    for path, conv in block_convs(model, 3):
        if path[:2] in basic:  # path[:2] is the block, e.g. ("layer1", 0)
            first_conv.setdefault(path[:2], (path, conv))
    for path, block in blocks:
        if isinstance(block, resnet_lib.Bottleneck):
            replace_module(model, path, ConvAdapterBottleneck(block, reduction, rngs=rngs, path=path))
        elif isinstance(block, effnet_lib.MBConvBlock) and block.expand_conv is not None:
            replace_module(model, path, ConvAdapterMBConv(block, reduction, rngs=rngs, path=path))
    for path, conv in first_conv.values():
        replace_module(model, path, ConvAdapter(conv, reduction, rngs=rngs, path=path))
    if isinstance(model, resnet_lib.ResNet):
        wrap_pool(model, lambda pool: PrePoolNorm(pool, model.num_features, rngs=rngs))


register(Method(
    name="conv_adapter",
    doc="Conv-Adapter (Chen et al. 2022): a depth-wise separable bottleneck (C/peft.reduction channels) per residual "
        "block with a per-channel scale (bottleneck: added after the 3x3's BatchNorm and ReLU; basic block: beside "
        "the first 3x3; EfficientNet: beside each expanded MBConv block), and on ResNets a trained BatchNorm before "
        "pooling, as the reference.",
    trainable=lambda cfg: any_of(adapter_variables, path_regex(PRE_POOL_NORM)),
    surgery=conv_adapter_surgery,
    archs=("cnn",),
))
