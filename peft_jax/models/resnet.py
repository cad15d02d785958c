"""ResNet-18/34/50/101 (He et al. 2016) as plain Flax NNX modules, NHWC, float32.

The module tree and the numerics follow torchvision's ``resnet*`` (v1.5: a bottleneck
strides on its 3x3 convolution) so that torchvision, timm and Hugging Face weights map
onto it one tensor to one tensor and give the same logits. Every padding is explicit:
Flax's ``'SAME'`` pads a stride-2 convolution asymmetrically, torch does not.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.errors import UserError
from peft_jax.models.init import draw, variance_scaling

# depth -> (block type, blocks per stage), as in torchvision.
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal ("normal" in JAX).
_conv_init = variance_scaling(2.0, "fan_out", "normal")


@jax.custom_vjp
def channel_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis of ``x``, with a faster kernel gradient on XLA:CPU.

    The kernel gradient contracts ``x`` over its pixels, so XLA transposes ``x``; left to itself
    it fuses that transpose with the BatchNorm and ReLU that produced ``x``, and the fused copy
    runs far below memory speed. An optimization barrier keeps ``x`` a plain array, so the
    transpose is a plain one (benchmarks/resnet_variants.py: the ResNet-50 step takes 0.8x the time).
    """
    return x @ kernel


def _channel_product_forward(x, kernel):
    return x @ kernel, (x, kernel)


def _channel_product_backward(residuals, g):
    x, kernel = residuals
    x = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]))
    return g @ kernel.T, (x.T @ g.reshape(-1, g.shape[-1])).astype(kernel.dtype)


channel_product.defvjp(_channel_product_forward, _channel_product_backward)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """An unpadded 1x1 convolution (HWIO kernel) as a matrix product after striding.

    XLA:CPU's matrix products are much faster than its convolutions, above all in the
    backward pass: ResNet-50 full fine-tuning measured 1.32x faster (benchmarks/resnet_variants.py).
    """
    sh, sw = strides
    return channel_product(x[:, ::sh, ::sw, :], kernel[0, 0].astype(x.dtype))


class Conv(nnx.Conv):
    """``nnx.Conv`` that runs its unpadded 1x1 convolutions through ``pointwise_conv``: same
    parameters, same result; larger kernels keep the convolution."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel_size != (1, 1) or self.feature_group_count != 1 or self.input_dilation not in (1, None) \
                or self.kernel_dilation not in (1, None) or self.padding not in (((0, 0), (0, 0)), "VALID"):
            return super().__call__(x)
        strides = self.strides if isinstance(self.strides, tuple) else (self.strides, self.strides)
        y = pointwise_conv(x, self.kernel[...], strides)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> Conv:
    """A bias-free convolution with torch's symmetric padding of kernel // 2."""
    p = kernel // 2
    return Conv(
        cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
        use_bias=False, kernel_init=_conv_init, rngs=rngs,
    )


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """torch BatchNorm2d defaults: momentum 0.1 in torch is 0.9 in Flax, eps 1e-5.

    The two-pass variance keeps statistics exact when activations have a large mean. One
    difference remains: torch updates running_var with the unbiased batch variance, Flax
    with the biased one (a factor n/(n-1), n = batch * height * width: negligible).
    """
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


def linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    """torch nn.Linear initialisation: weight and bias uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(din)

    def bias_init(key, shape, dtype=jnp.float32):
        return draw(jax.random.uniform, key, shape, -bound, bound)

    return nnx.Linear(
        din, dout, rngs=rngs, bias_init=bias_init,
        kernel_init=variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride=2, padding=1): the padding is -inf, never a real value."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


class GlobalAvgPool(nnx.Module):
    """Spatial mean, (N, H, W, C) -> (N, C). A module so that PEFT methods can act on the pooled feature."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.mean(axis=(1, 2))


class Downsample(nnx.Module):
    """Projection shortcut: 1x1 strided convolution + BatchNorm."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(cin, cout, 1, stride, rngs)
        self.bn = batch_norm(cout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(cin, width, 3, stride, rngs)
        self.bn1 = batch_norm(width, rngs)
        self.conv2 = conv(width, width, 3, 1, rngs)
        self.bn2 = batch_norm(width, rngs)
        needs_projection = stride != 1 or cin != width
        self.downsample = Downsample(cin, width, stride, rngs=rngs) if needs_projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand, with a residual connection (ResNet-50/101)."""

    expansion = BOTTLENECK_EXPANSION

    def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
        cout = width * self.expansion
        self.conv1 = conv(cin, width, 1, 1, rngs)
        self.bn1 = batch_norm(width, rngs)
        self.conv2 = conv(width, width, 3, stride, rngs)
        self.bn2 = batch_norm(width, rngs)
        self.conv3 = conv(width, cout, 1, 1, rngs)
        self.bn3 = batch_norm(cout, rngs)
        needs_projection = stride != 1 or cin != cout
        self.downsample = Downsample(cin, cout, stride, rngs=rngs) if needs_projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    """ResNet classifier: ``model(images)`` maps NHWC float images to logits.

    BatchNorm uses batch statistics and updates its running averages after
    ``model.train()``, and uses the running averages after ``model.eval()``.
    """

    def __init__(self, depth: int, *, num_classes: int = 1000, rngs: nnx.Rngs):
        if depth not in RESNET_DEPTHS:
            raise UserError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        kind, blocks = RESNET_DEPTHS[depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = Conv(
            3, 64, kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
            use_bias=False, kernel_init=_conv_init, rngs=rngs,
        )
        self.bn1 = batch_norm(64, rngs)
        cin = 64
        stages = []
        for i, (width, n) in enumerate(zip(STAGE_WIDTHS, blocks)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(block_cls(cin, width, stride, rngs=rngs))
                cin = width * block_cls.expansion
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = GlobalAvgPool()
        self.num_features = cin
        self.num_classes = num_classes
        self.head = linear(cin, num_classes, rngs)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last convolutional stage's output, (N, H/32, W/32, num_features): Grad-CAM's layer."""
        x = max_pool_3x3_s2(nnx.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return x

    def logits_from_feature_map(self, x: jax.Array) -> jax.Array:
        """The rest of the forward pass: ``model(images) == logits_from_feature_map(feature_map(images))``."""
        return self.head(self.pool(x))

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled features of the last stage: (N, num_features)."""
        return self.pool(self.feature_map(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.logits_from_feature_map(self.feature_map(x))
