"""(IA)^3 (Liu et al. 2022): learned per-channel vectors rescaling keys, values and the MLP's hidden units.

``l_k * k``, ``l_v * v`` and ``fc2(l_ff * gelu(fc1(x)))``, all starting at one (the identity).
A scale on a linear layer's output or input folds into its kernel, so (IA)^3 merges.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import AdapterParam, Method, adapter_variables, iter_wrapped, leading_shape, register, replace_module, wrap_modules
from peft_jax.errors import UserError


class ChannelScale(nnx.Module):
    """A learned vector multiplying a linear layer's output channels (``side='out'``) or its input (``'in'``)."""

    def __init__(self, base: nnx.Linear, side: str):
        kernel = base.kernel[...]
        dim = kernel.shape[-1] if side == "out" else kernel.shape[-2]
        self.base = base
        self.side = side
        self.scale = AdapterParam(jnp.ones(leading_shape(kernel, 2) + (dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.scale[...].astype(x.dtype)
        return self.base(x * s) if self.side == "in" else self.base(x) * s


def merge_channel_scales(model: nnx.Module) -> None:
    """Folds every ``ChannelScale`` into its linear layer: columns (and bias) for outputs, rows for inputs."""
    for path, wrapper in iter_wrapped(model, ChannelScale):
        base, s = wrapper.base, wrapper.scale[...]
        if not isinstance(base, nnx.Linear):
            raise UserError(f"cannot merge the scale at {path}: it wraps a {type(base).__name__}, not a linear layer")
        kernel = base.kernel[...]
        if wrapper.side == "out":
            base.kernel[...] = (kernel * s[..., None, :]).astype(kernel.dtype)
            if base.bias is not None:
                base.bias[...] = (base.bias[...] * s).astype(kernel.dtype)
        else:
            base.kernel[...] = (kernel * s[..., :, None]).astype(kernel.dtype)
        replace_module(model, path, base)


def ia3_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del cfg, rngs
    wrap_modules(model, (nnx.Linear,), r"attn/(key|value)$", lambda p, m: ChannelScale(m, "out"), what="ia3")
    wrap_modules(model, (nnx.Linear,), r"mlp/fc2$", lambda p, m: ChannelScale(m, "in"), what="ia3")


register(Method(
    name="ia3",
    doc="(IA)^3: learned vectors rescaling keys, values and the MLP hidden activations.",
    trainable=lambda cfg: adapter_variables,
    surgery=ia3_surgery,
    merge=merge_channel_scales,
    archs=("vit",),
))
