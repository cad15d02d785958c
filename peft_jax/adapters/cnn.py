"""Pieces shared by the CNN methods: where each architecture keeps its blocks, stem and top
(``LAYOUTS``, the one place that knows the model trees), running a second kernel with a
convolution's geometry, the parallel 1x1 adapter and its fold, and folding an affine map of
the pooled feature into the head.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from peft_jax.adapters.core import AdapterParam, Path, iter_wrapped, modules_matching, path_str, replace_module
from peft_jax.errors import UserError
from peft_jax.models.efficientnet import EfficientNet
from peft_jax.models.resnet import ResNet, pointwise_conv


@dataclasses.dataclass(frozen=True)
class CNNLayout:
    """Where the CNN methods find one architecture's parts: regexes on logical module paths.

    ``block`` matches a residual block (the unit ``partial`` counts and ``conv_adapter``
    adapts; the convolutions under it are the ones TSA, residual adapters and ``lora_conv``
    sit beside), ``stem`` the first convolution, ``top`` the modules between the last block
    and the pooled feature (trained by ``partial`` with the last blocks).
    """

    block: str
    stem: str
    top: str | None = None


LAYOUTS: dict[type, CNNLayout] = {
    ResNet: CNNLayout(block=r"^layer\d+/\d+$", stem=r"^conv1$"),
    EfficientNet: CNNLayout(block=r"^blocks/\d+$", stem=r"^conv_stem$", top=r"^(conv_head|bn1)$"),
}


def cnn_layout(model: nnx.Module) -> CNNLayout:
    for cls, layout in LAYOUTS.items():
        if isinstance(model, cls):
            return layout
    raise UserError(f"{type(model).__name__} has no CNN layout; the CNN methods know "
                     f"{', '.join(cls.__name__ for cls in LAYOUTS)} (peft_jax/adapters/cnn.py LAYOUTS)")


def outermost(found: list[tuple[Path, nnx.Module]]) -> list[tuple[Path, nnx.Module]]:
    """One module per logical path, the outermost wrapper, in forward order (paths sort like the model's lists)."""
    kept: dict[Path, tuple[Path, nnx.Module]] = {}
    for path, module in sorted(found, key=lambda t: len(t[0])):
        kept.setdefault(tuple(p for p in path if p != "base"), (path, module))
    return [kept[k] for k in sorted(kept)]


def residual_blocks(model: nnx.Module) -> list[tuple[Path, nnx.Module]]:
    """The residual blocks (ResNet basic/bottleneck, EfficientNet MBConv) in forward order."""
    return outermost(modules_matching(model, (nnx.Module,), cnn_layout(model).block))


def block_convs(model: nnx.Module, kernel_size: int | None = None) -> list[tuple[Path, nnx.Conv]]:
    """The convolutions of the residual blocks, the k x k ones only if ``kernel_size`` is given."""
    found = modules_matching(model, (nnx.Conv,), cnn_layout(model).block.removesuffix("$") + "/")
    return [(p, m) for p, m in found if kernel_size is None or tuple(m.kernel_size) == (kernel_size,) * 2]


def is_depthwise(conv: nnx.Conv) -> bool:
    """One filter per channel: as many groups as input and output channels."""
    return conv.feature_group_count > 1 and conv.kernel.shape[-2] == 1 and conv.feature_group_count == conv.out_features


def spatial_block_convs(model: nnx.Module) -> list[tuple[Path, nnx.Conv]]:
    """The k x k (k > 1) convolutions of the blocks: ResNet's 3x3s, EfficientNet's depth-wise ones.

    TSA and the residual adapters adapt these, as their references adapt the blocks' 3x3 convolutions.
    """
    return [(p, m) for p, m in block_convs(model) if max(m.kernel_size) > 1]


def dense_convs(model: nnx.Module, *, blocks_only: bool) -> list[tuple[Path, nnx.Conv]]:
    """Ungrouped convolutions (every one of a ResNet; EfficientNet's stem, expand, project and head ones)."""
    found = block_convs(model) if blocks_only else modules_matching(model, (nnx.Conv,))
    return [(p, m) for p, m in found if m.feature_group_count == 1]


def _pair(value: int | tuple[int, ...] | None, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


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
            raise UserError(f"{what}: {path_str(path)} is a grouped, input-dilated or {padding!r}-padded "
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
    """Why a 1x1 adapter with this convolution's stride cannot read the pixels of its centre tap (None: it can).

    The adapter must have the convolution's connectivity too: dense beside an ungrouped
    convolution, one weight per channel beside a depth-wise one.
    """
    n = len(conv.kernel_size)
    if conv.feature_group_count != 1 and not is_depthwise(conv) or _pair(conv.input_dilation, n) != (1,) * n:
        return "it is grouped (other than depth-wise) or input-dilated"
    if any(k % 2 == 0 for k in conv.kernel_size):
        return f"its kernel {tuple(conv.kernel_size)} has no centre tap"
    padding = canonicalize_padding(conv.padding, n)
    if isinstance(padding, str):
        return None if padding in ("SAME", "VALID") else f"its padding is {padding!r}"
    centre = [d * (k // 2) for k, d in zip(conv.kernel_size, _pair(conv.kernel_dilation, n))]
    if any(max(pad) > c for pad, c in zip(padding, centre)):
        return f"its padding {conv.padding!r} is more than {centre} on a side, so some centre taps read padding"
    return None


@dataclasses.dataclass(frozen=True)
class CentreTap:
    """The input pixels a convolution's centre tap reads, for a 1x1 adapter that must read the same ones.

    Output pixel o of a convolution with stride s, (dilated) window w and low padding p reads input
    pixels s*o - p + j, 0 <= j < w; the centre tap j = (w - 1) / 2 reads s*o + (w - 1) / 2 - p. A 1x1
    convolution reading every s-th pixel from that offset sees exactly these pixels, so it folds
    into the tap wherever no centre falls in the padding (``centre_tap_problem``). TensorFlow's
    "SAME" padding depends on the input size (a stride-2 convolution of an even size pads one
    more pixel at the bottom/right), so the offset is computed per call.
    """

    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, conv: nnx.Conv) -> CentreTap:
        n = len(conv.kernel_size)
        window = tuple(d * (k - 1) + 1 for k, d in zip(conv.kernel_size, _pair(conv.kernel_dilation, n)))
        padding = canonicalize_padding(conv.padding, n)
        padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        return cls(window, _pair(conv.strides, n), padding)

    def select(self, x: jax.Array) -> jax.Array:
        """The (N, H_out, W_out, C) centre-tap pixels of NHWC ``x``."""
        spatial = x.shape[1:-1]
        if self.padding == "VALID":
            pads = ((0, 0),) * len(spatial)
        elif self.padding == "SAME":
            pads = jax.lax.padtype_to_pads(spatial, self.window, self.strides, "SAME")
        else:
            pads = self.padding
        index = [slice(None)]
        for size, w, s, (low, high) in zip(spatial, self.window, self.strides, pads):
            out = (size + low + high - w) // s + 1
            start = (w - 1) // 2 - low
            index.append(slice(start, start + s * (out - 1) + 1, s))
        return x[tuple(index)]


class ParallelConv(nnx.Module):
    """``base(x) + A(x)``: a 1x1 adapter beside a convolution, with its stride, reading its centre-tap pixels.

    ``alpha`` is a (in, out) matrix, or a (channels,) vector for a channel-wise adapter (a
    diagonal matrix; the only form beside a depth-wise convolution). The adapter reads the
    pixels of the base's centre tap, so ``fold`` adds it to that tap: the same convolution, no adapter.
    """

    def __init__(self, base: nnx.Conv, alpha: jax.Array, *, what: str, path: Path):
        problem = centre_tap_problem(base)
        if problem is None and is_depthwise(base) and alpha.ndim != 1:
            problem = "it is depth-wise, so its adapter is one weight per channel"
        if problem is not None:
            raise UserError(f"{what}: cannot put a parallel 1x1 adapter beside {path_str(path)}: {problem}")
        self.base = base
        self.tap = CentreTap.of(base)
        self.alpha = AdapterParam(alpha)

    def matrix(self) -> jax.Array:
        alpha = self.alpha[...]
        return alpha if alpha.ndim == 2 else jnp.diag(alpha)

    def __call__(self, x: jax.Array) -> jax.Array:
        xs = self.tap.select(x)
        alpha = self.alpha[...].astype(x.dtype)
        return self.base(x) + (xs * alpha if alpha.ndim == 1 else xs @ alpha)

    def fold(self) -> nnx.Conv:
        kernel = self.base.kernel[...]
        kh, kw = kernel.shape[:2]
        tap = self.alpha[...][None] if is_depthwise(self.base) else self.matrix()  # a depth-wise tap is (1, C)
        self.base.kernel[...] = kernel.at[kh // 2, kw // 2].add(tap.astype(kernel.dtype))
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
