"""LoRA on convolutions (Hu et al. 2022, in the convolutional form of huggingface/peft).

``base(x) + (alpha / r) * up(down(x))``: ``down`` is a k x k convolution to r channels with the
base's kernel size, stride, padding and dilation; ``up`` is a 1x1 convolution back to the
output channels, zero at start so training begins at the backbone. Convolution is linear in
its kernel, so the update is the kernel ``down @ up`` and folds into the base (``merge``).

``peft.targets`` picks the convolutions: ``"blocks"`` (every dense convolution of the
residual blocks: all of a ResNet's, shortcuts included, EfficientNet's expand and project
1x1s; the default), ``"all"`` (every dense convolution, the stem and EfficientNet's head
convolution too) or a regex on module paths such as ``r"layer4/\\d+/conv2$"``. The presets
leave depth-wise convolutions alone, as huggingface/peft does at any rank below the channel
count (it requires the rank to be a multiple of the groups and cannot merge grouped
convolutions); a depth-wise kernel has no channel matrix to factorise. The attention presets
of ViT LoRA (``"qv"``, the config's default, ``"qkv"``, ``"attn"``) name no convolution and
mean the default here.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import Geometry, dense_convs
from peft_jax.adapters.core import Method, Path, adapter_variables, iter_wrapped, register, replace_module, wrap_modules
from peft_jax.errors import UserError
from peft_jax.models.init import draw

PRESETS = ("blocks", "all")  # the dense convolutions of the residual blocks / of the whole backbone
DEFAULT_TARGETS = "blocks"
ATTENTION_PRESETS = ("qv", "qkv", "attn")


def target_convs(model: nnx.Module, cfg: ml_collections.ConfigDict) -> str | list[tuple[Path, nnx.Conv]]:
    """A preset's convolutions, or the user's regex on module paths."""
    targets = cfg.get("targets") or DEFAULT_TARGETS
    if targets in ATTENTION_PRESETS:
        targets = DEFAULT_TARGETS
    return dense_convs(model, blocks_only=targets == "blocks") if targets in PRESETS else targets


class LoRAConv(nnx.Module):
    """A convolution plus a rank-r update: a k x k convolution to r channels, then 1x1 back (zero at start)."""

    def __init__(self, base: nnx.Conv, rank: int, alpha: float, *, rngs: nnx.Rngs, path: Path):
        kh, kw, cin, cout = base.kernel.shape
        self.base = base
        self.geometry = Geometry.of(base, "lora_conv", path)
        self.scaling = alpha / rank
        # Kaiming-uniform with a=sqrt(5), as torch initialises the down convolution: U(+-1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(kh * kw * cin)
        self.lora_a = nnx.LoRAParam(draw(jax.random.uniform, rngs.params(), (kh, kw, cin, rank), -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, cout), jnp.float32))

    def delta(self) -> jax.Array:
        """The update of the kernel, (kh, kw, in, out)."""
        return self.scaling * jnp.einsum("hwir,ro->hwio", self.lora_a[...], self.lora_b[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        update = self.geometry.conv(x, self.lora_a[...]) @ self.lora_b[...].astype(x.dtype)
        return self.base(x) + self.scaling * update


def lora_conv_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    rank = int(cfg.rank)
    if rank < 1:
        raise UserError(f"peft.rank must be a positive integer, got {cfg.rank}")
    alpha = float(cfg.alpha if cfg.get("alpha") is not None else rank)

    def wrap(path: Path, conv: nnx.Conv) -> LoRAConv:
        return LoRAConv(conv, rank, alpha, rngs=rngs, path=path)

    targets = target_convs(model, cfg)
    if isinstance(targets, str):
        wrap_modules(model, (nnx.Conv,), targets, wrap, what="lora_conv (peft.targets)")
        return
    for path, conv in targets:
        replace_module(model, path, wrap(path, conv))


def lora_conv_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, LoRAConv):
        base = wrapper.base
        base.kernel[...] = base.kernel[...] + wrapper.delta().astype(base.kernel[...].dtype)
        replace_module(model, path, base)


register(Method(
    name="lora_conv",
    doc="LoRA on convolutions: a k x k down-projection to rank r and a zero-initialised 1x1 up-projection beside "
        "chosen convolutions (peft.targets: 'blocks' by default, 'all', or a regex; presets skip depth-wise ones).",
    trainable=lambda cfg: adapter_variables,
    surgery=lora_conv_surgery,
    merge=lora_conv_merge,
    archs=("cnn",),
))
