"""The Inception-v3 of FID (Heusel et al. 2017) as a plain Flax NNX module, NHWC, float32, eval mode.

FID numbers are only comparable when computed with one particular network: TensorFlow's
2015-12-05 Inception graph, which pytorch-fid ported to PyTorch. That graph differs from
torchvision's Inception-v3 in its weights (1008 classes) and in three details reproduced
here: the 3x3 average pools of the A, C and E blocks ignore their zero padding (TensorFlow's
pooling), and the pooling branch of the last E block takes a max, not a mean. Module and
branch names follow torchvision (``Mixed_5b.branch5x5_1.conv``) so that the pytorch-fid
state dict maps onto the model one tensor to one tensor (``peft_jax/checkpoints/inception.py``).

Input: NHWC images in [-1, 1]; by default they are resized bilinearly (half-pixel centres,
no antialiasing, as torch's ``F.interpolate(mode="bilinear", align_corners=False)``) to
299 x 299 first. Output: the 2048-d "pool3" features that FID uses, optionally with the
1008 logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.errors import UserError

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TensorFlow graph's 1001 ImageNet classes, padded


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class ConvBN(nnx.Module):
    """Bias-free convolution, BatchNorm (eps 1e-3, TensorFlow's) and ReLU: every conv of the network."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
        (kh, kw), (ph, pw) = _pair(kernel), _pair(padding)
        self.conv = nnx.Conv(cin, cout, kernel_size=(kh, kw), strides=(stride, stride),
                             padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, momentum=0.9, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    """3x3 max pool; padding, if any, is -inf so that it never wins."""
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 mean over the real pixels of each window only (TensorFlow's SAME average pool)."""
    window, strides, pads = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / count


class InceptionA(nnx.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = ConvBN(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = ConvBN(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = ConvBN(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = ConvBN(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = ConvBN(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 outputs; `pool` is "avg" (Mixed_7b) or "max" (Mixed_7c in the FID graph)."""

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise UserError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = ConvBN(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool(x, 1, pad=1) if self.pool == "max" else avg_pool_same(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], axis=-1)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """NHWC bilinear resize to size x size as torch's F.interpolate(align_corners=False, antialias=False).

    ``jax.image.resize`` antialiases when it shrinks by default; pytorch-fid's reference does not.
    """
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, size, size, c), method="linear", antialias=False)


class InceptionV3(nnx.Module):
    """FID Inception-v3: NHWC images in [-1, 1] -> (N, 2048) pool3 features (and, on request, the logits).

    With ``resize_input=False`` the images are used at their own size (at least 75 x 75).
    """

    def __init__(self, *, resize_input: bool = True, rngs: nnx.Rngs):
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def __call__(self, images: jax.Array, *, with_logits: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        x = resize_bilinear(images) if self.resize_input else images
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = max_pool(x, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = x.mean(axis=(1, 2))
        if with_logits:
            return features, self.fc(features)
        return features
