"""Pieces shared by the CNN methods: which convolutions they adapt, running a second kernel
with a convolution's geometry, the parallel 1x1 adapter and its fold, and folding an affine
map of the pooled feature into the head.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from peft_jax.adapters.core import AdapterParam, Path, iter_wrapped, modules_matching, path_str, replace_module
from peft_jax.models.resnet import pointwise_conv

# Convolutions inside the residual blocks (layer1..4), not the stem.
BLOCK_CONVS = r"^layer\d+/\d+/"


def _pair(value: int | tuple[int, ...] | None, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


def block_convs(model: nnx.Module, kernel_size: int) -> list[tuple[Path, nnx.Conv]]:
    """The k x k convolutions of the residual blocks (the reference TSA and residual adapters adapt the 3x3 ones)."""
    return [(p, m) for p, m in modules_matching(model, (nnx.Conv,), BLOCK_CONVS)
            if tuple(m.kernel_size) == (kernel_size, kernel_size)]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A convolution's strides, padding and dilation, kept by an adapter that convolves like it.

    Captured at surgery: another method may later wrap the base convolution, so an adapter
    never reads them from its ``base`` at call time.
    """

    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]

    @classmethod
    def of(cls, conv: nnx.Conv, what: str, path: Path) -> Geometry:
        n = len(conv.kernel_size)
        padding = canonicalize_padding(conv.padding, n)
        padding_mode = isinstance(padding, str) and padding not in ("SAME", "VALID")  # CIRCULAR, REFLECT, CAUSAL
        if conv.feature_group_count != 1 or _pair(conv.input_dilation, n) != (1,) * n or padding_mode:
            raise ValueError(f"{what}: {path_str(path)} is a grouped, input-dilated or {padding!r}-padded "
                             "convolution, which this method does not adapt")
        padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        return cls(_pair(conv.strides, n), padding, _pair(conv.kernel_dilation, n))

    def conv(self, x: jax.Array, kernel: jax.Array, *, groups: int = 1) -> jax.Array:
        """Convolves NHWC ``x`` with an HWIO ``kernel`` like the base convolution."""
        if kernel.shape[:2] == (1, 1) and groups == 1 and self.padding in (((0, 0), (0, 0)), "VALID"):
            return pointwise_conv(x, kernel, self.strides)
        return jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), self.strides, self.padding, rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def centre_tap_problem(conv: nnx.Conv) -> str | None:
    """Why a 1x1 adapter with this convolution's stride does not read the pixels of its centre tap (None: it does).

    Output pixel o of a k x k convolution with stride s, dilation d and symmetric padding p reads
    input pixels s*o - p + d*i; the centre tap i = k//2 reads s*o exactly when p = d*(k//2), which
    is what a 1x1 convolution with stride s and no padding reads, with the same output size.
    """
    n = len(conv.kernel_size)
    if conv.feature_group_count != 1 or _pair(conv.input_dilation, n) != (1,) * n:
        return "it is grouped or input-dilated"
    padding = canonicalize_padding(conv.padding, n)
    strides, dilation = _pair(conv.strides, n), _pair(conv.kernel_dilation, n)
    for k, s, d, i in zip(conv.kernel_size, strides, dilation, range(n)):
        if k % 2 == 0:
            return f"its kernel {tuple(conv.kernel_size)} has no centre tap"
        c = d * (k // 2)
        if padding == "SAME" and s == 1 or padding == "VALID" and c == 0:
            continue
        if isinstance(padding, str) or tuple(padding[i]) != (c, c):
            return f"its padding {conv.padding!r} is not {c} on both sides"
    return None


class ParallelConv(nnx.Module):
    """``base(x) + A(x)``: a 1x1 adapter beside a convolution, with its stride, reading the same input.

    ``alpha`` is a (in, out) matrix, or a (channels,) vector for a channel-wise adapter (a
    diagonal matrix). The adapter reads the pixels of the base's centre tap, so ``fold``
    adds it to that tap: the same convolution, no adapter.
    """

    def __init__(self, base: nnx.Conv, alpha: jax.Array, *, what: str, path: Path):
        problem = centre_tap_problem(base)
        if problem is not None:
            raise ValueError(f"{what}: cannot put a parallel 1x1 adapter beside {path_str(path)}: {problem}")
        self.base = base
        self.strides = _pair(base.strides, 2)
        self.alpha = AdapterParam(alpha)

    def matrix(self) -> jax.Array:
        alpha = self.alpha[...]
        return alpha if alpha.ndim == 2 else jnp.diag(alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        sh, sw = self.strides
        xs = x[:, ::sh, ::sw, :]
        alpha = self.alpha[...].astype(x.dtype)
        return self.base(x) + (xs * alpha if alpha.ndim == 1 else xs @ alpha)

    def fold(self) -> nnx.Conv:
        kernel = self.base.kernel[...]
        kh, kw = kernel.shape[:2]
        self.base.kernel[...] = kernel.at[kh // 2, kw // 2].add(self.matrix().astype(kernel.dtype))
        return self.base


def merge_parallel(model: nnx.Module, wrapper_type: type[ParallelConv]) -> None:
    for path, wrapper in iter_wrapped(model, wrapper_type):
        replace_module(model, path, wrapper.fold())


def wrap_pool(model: nnx.Module, wrap: Callable[[nnx.Module], nnx.Module]) -> None:
    """Wraps the ResNet's pooled-feature module (or the outermost wrapper already around it)."""
    model.pool = wrap(model.pool)


def fold_into_head(head: nnx.Linear, matrix: jax.Array, shift: jax.Array | None) -> None:
    """head(x @ M + t) = x @ (M W) + (t W + b): folds an affine map of the pooled feature into the head."""
    kernel = head.kernel[...]
    if shift is not None:
        head.bias[...] = (head.bias[...] + shift.astype(kernel.dtype) @ kernel).astype(head.bias[...].dtype)
    head.kernel[...] = (matrix.astype(kernel.dtype) @ kernel).astype(kernel.dtype)
