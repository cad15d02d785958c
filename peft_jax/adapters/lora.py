"""LoRA (Hu et al. 2022) on any linear layer chosen by a regex on module paths."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import Method, adapter_variables, iter_wrapped, leading_shape, register, replace_module, wrap_modules

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


class LoRALinear(nnx.Module):
    """``base(x) + (alpha / r) * x A B`` with A (in, r) random and B (r, out) zero, so training starts at the base."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        kernel = base.kernel[...]
        lead = leading_shape(kernel, 2)
        din, dout = kernel.shape[-2:]
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        # Kaiming-uniform with a=sqrt(5) as in the reference implementation: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(din)
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), lead + (din, rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, dout), jnp.float32))

    def delta(self) -> jax.Array:
        """The low-rank update of the kernel, (..., in, out)."""
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        update = (x @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return self.base(x) + self.scaling * update


def lora_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    rank = int(cfg.rank)
    if rank < 1:
        raise ValueError(f"peft.rank must be a positive integer, got {cfg.rank}")
    alpha = float(cfg.alpha if cfg.get("alpha") is not None else rank)
    wrap_modules(model, (nnx.Linear,), target_pattern(cfg),
                 lambda path, m: LoRALinear(m, rank, alpha, rngs=rngs), what="lora (peft.targets)")


def lora_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, LoRALinear):
        base = wrapper.base
        base.kernel[...] = base.kernel[...] + wrapper.delta().astype(base.kernel[...].dtype)
        replace_module(model, path, base)


register(Method(
    name="lora",
    doc="LoRA: a rank-r update A B beside chosen linear layers (peft.targets; default q and v).",
    trainable=lambda cfg: adapter_variables,
    surgery=lora_surgery,
    merge=lora_merge,
    archs=("vit",),
))
