"""LoRA (Hu et al. 2022) and DoRA (Liu et al. 2024) on any linear layer chosen by a regex on module paths."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import AdapterParam, Method, adapter_variables, iter_wrapped, leading_shape, register, replace_module, wrap_modules
from peft_jax.errors import UserError
from peft_jax.models.init import draw

# Presets for ``peft.targets``; anything else is used as a regex on module paths.
TARGET_PRESETS = {
    "qv": r"attn/(query|value)$",
    "qkv": r"attn/(query|key|value)$",
    "attn": r"attn/(query|key|value|out)$",
    "all": r"(attn/(query|key|value|out)|mlp/(fc1|fc2))$",
}


def target_pattern(cfg: ml_collections.ConfigDict) -> str:
    targets = cfg.get("targets") or "qv"
    return TARGET_PRESETS.get(targets, targets)


def _lora_factors(kernel: jax.Array, rank: int, rngs: nnx.Rngs) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """A (..., in, r) Kaiming-uniform (a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) as in the reference code, B zero."""
    lead = leading_shape(kernel, 2)
    din, dout = kernel.shape[-2:]
    bound = 1.0 / math.sqrt(din)
    a = nnx.LoRAParam(draw(jax.random.uniform, rngs.params(), lead + (din, rank), -bound, bound))
    return a, nnx.LoRAParam(jnp.zeros(lead + (rank, dout), jnp.float32))


class LoRALinear(nnx.Module):
    """``base(x) + (alpha / r) * x A B`` with A (in, r) random and B (r, out) zero, so training starts at the base."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a, self.lora_b = _lora_factors(base.kernel[...], rank, rngs)

    def delta(self) -> jax.Array:
        """The low-rank update of the kernel, (..., in, out)."""
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        update = (x @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return self.base(x) + self.scaling * update


class DoRALinear(nnx.Module):
    """DoRA: the LoRA-updated kernel ``W0 + (alpha / r) A B``, normalised per output column and rescaled by a
    learned magnitude ``m`` (initially the column norms of ``W0``), so direction and magnitude train apart.

    As in the paper (section 4.3), the column norm is a constant for the gradient, which saves the
    memory of differentiating through it; the forward value is exact.
    """

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        kernel = base.kernel[...]
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a, self.lora_b = _lora_factors(kernel, rank, rngs)
        self.magnitude = AdapterParam(jnp.linalg.norm(kernel.astype(jnp.float32), axis=-2))

    def delta(self) -> jax.Array:
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])

    def column_scale(self) -> jax.Array:
        """m / ||W0 + delta|| per output column."""
        norm = jnp.linalg.norm(self.base.kernel[...].astype(jnp.float32) + self.delta(), axis=-2)
        return self.magnitude[...] / jax.lax.stop_gradient(norm)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not isinstance(self.base, nnx.Linear):
            raise UserError(f"dora normalises the kernel of the layer it wraps, but another method wrapped that layer "
                             f"inside it ({type(self.base).__name__}); list dora last in peft.method (e.g. 'ia3+dora')")
        dtype = x.dtype
        bias = self.base.bias[...].astype(dtype) if self.base.bias is not None else 0.0
        update = (x @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return (self.base(x) - bias + self.scaling * update) * self.column_scale().astype(dtype) + bias


def _rank_alpha(cfg: ml_collections.ConfigDict) -> tuple[int, float]:
    rank = int(cfg.rank)
    if rank < 1:
        raise UserError(f"peft.rank must be a positive integer, got {cfg.rank}")
    return rank, float(cfg.alpha if cfg.get("alpha") is not None else rank)


def lora_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    rank, alpha = _rank_alpha(cfg)
    wrap_modules(model, (nnx.Linear,), target_pattern(cfg),
                 lambda path, m: LoRALinear(m, rank, alpha, rngs=rngs), what="lora (peft.targets)")


def dora_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    rank, alpha = _rank_alpha(cfg)
    wrap_modules(model, (nnx.Linear,), target_pattern(cfg),
                 lambda path, m: DoRALinear(m, rank, alpha, rngs=rngs), what="dora (peft.targets)")


def lora_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, LoRALinear):
        base = wrapper.base
        base.kernel[...] = base.kernel[...] + wrapper.delta().astype(base.kernel[...].dtype)
        replace_module(model, path, base)


def dora_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, DoRALinear):
        base = wrapper.base
        kernel = base.kernel[...]
        merged = (kernel.astype(jnp.float32) + wrapper.delta()) * wrapper.column_scale()[..., None, :]
        base.kernel[...] = merged.astype(kernel.dtype)
        replace_module(model, path, base)


register(Method(
    name="lora",
    doc="LoRA: a rank-r update A B beside chosen linear layers (peft.targets; default q and v).",
    trainable=lambda cfg: adapter_variables,
    surgery=lora_surgery,
    merge=lora_merge,
    archs=("vit", "unet"),  # on the U-Net, peft.targets names its attention projections (configs/sd15_lora.py)
))

register(Method(
    name="dora",
    doc="DoRA: LoRA on the direction of chosen linear layers' kernels plus a learned per-column magnitude.",
    trainable=lambda cfg: adapter_variables,
    surgery=dora_surgery,
    merge=dora_merge,
    archs=("vit",),
))
