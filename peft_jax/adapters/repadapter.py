"""RepAdapter (Luo et al. 2023): a linear adapter in front of the attention and the MLP, merged away after training.

After each block's ``norm1`` and ``norm2``: ``y + s * up(dropout(down(y)))`` with ``down`` (width -> r)
and a grouped ``up`` (r -> width, ``peft.groups`` groups), no non-linearity. Rank ``peft.rank``
(8), scale ``peft.scale`` (1), dropout ``peft.dropout`` (0.1); ``down`` is Xavier-uniform, the rest
starts at zero, as in the reference code. Being linear, the adapter folds into the layers that
read the norm's output (query, key, value; fc1): ``merge`` leaves a plain ViT.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (
    AdapterParam, Method, adapter_dropout, adapter_variables, get_module, iter_wrapped, leading_shape,
    path_str, register, replace_module, wrap_modules,
)
from peft_jax.errors import UserError
from peft_jax.models.init import draw


class RepAdapterNorm(nnx.Module):
    """``y + s * (dropout(y A + a) B + b)`` on the output ``y`` of a LayerNorm; B is block-diagonal (grouped)."""

    def __init__(self, base: nnx.LayerNorm, rank: int, groups: int, scale: float, dropout: nnx.Dropout, *,
                 rngs: nnx.Rngs):
        gamma = base.scale[...]
        lead, dim = leading_shape(gamma, 1), gamma.shape[-1]
        if rank % groups or dim % groups:
            raise UserError(f"repadapter: peft.rank={rank} and the width {dim} must be multiples of peft.groups={groups}")
        bound = math.sqrt(6.0 / (dim + rank))  # Xavier-uniform of a (rank, dim, 1) Conv1d kernel
        self.base = base
        self.scale = scale
        self.down_kernel = AdapterParam(draw(jax.random.uniform, rngs.params(), lead + (dim, rank), -bound, bound))
        self.down_bias = AdapterParam(jnp.zeros(lead + (rank,), jnp.float32))
        self.up_kernel = AdapterParam(jnp.zeros(lead + (groups, rank // groups, dim // groups), jnp.float32))
        self.up_bias = AdapterParam(jnp.zeros(lead + (dim,), jnp.float32))
        self.dropout = dropout

    def dense_up(self) -> jax.Array:
        """The grouped up-projection as a block-diagonal (..., r, width) matrix."""
        up = self.up_kernel[...]
        g, k, c = up.shape[-3:]
        return jnp.einsum("...gkc,gh->...gkhc", up, jnp.eye(g, dtype=up.dtype)).reshape(up.shape[:-3] + (g * k, g * c))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        dt = y.dtype
        h = self.dropout(y @ self.down_kernel[...].astype(dt) + self.down_bias[...].astype(dt))
        up = self.up_kernel[...].astype(dt)
        out = jnp.einsum("...gk,gkc->...gc", h.reshape(h.shape[:-1] + up.shape[:2]), up).reshape(y.shape)
        return y + self.scale * (out + self.up_bias[...].astype(dt))


def repadapter_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    rank, groups = int(cfg.rank), int(cfg.groups)
    if rank < 1 or groups < 1:
        raise UserError(f"repadapter: peft.rank and peft.groups must be positive, got {rank} and {groups}")
    scale = float(cfg.scale) if cfg.get("scale") is not None else 1.0
    rate = float(cfg.dropout) if cfg.get("dropout") is not None else 0.1

    def wrap(path, norm: nnx.LayerNorm) -> RepAdapterNorm:
        dropout = adapter_dropout(model, rate, rngs, what="repadapter (peft.dropout)")
        return RepAdapterNorm(norm, rank, groups, scale, dropout, rngs=rngs)

    wrap_modules(model, (nnx.LayerNorm,), r"blocks(/\d+)?/norm[12]$", wrap, what="repadapter")


def _consumers(model: nnx.Module, path: tuple) -> list[nnx.Module]:
    block = get_module(model, path[:-1])
    return [block.attn.query, block.attn.key, block.attn.value] if path[-1] == "norm1" else [block.mlp.fc1]


def repadapter_merge(model: nnx.Module) -> None:
    """``L(y (I + s A B) + s (a B + b))``: folds into the kernel and bias of every layer ``L`` reading the norm."""
    for path, wrapper in iter_wrapped(model, RepAdapterNorm):
        consumers = _consumers(model, path)
        bad = [type(m).__name__ for m in consumers if not isinstance(m, nnx.Linear)]
        if bad:
            raise UserError(f"repadapter at {path_str(path)}: cannot merge into {bad} (another method wraps the "
                             "layers that read it); list repadapter first in peft.method (e.g. 'repadapter+lora') so it merges last")
        s, a, down_bias = wrapper.scale, wrapper.down_kernel[...], wrapper.down_bias[...]
        up = wrapper.dense_up()
        shift = s * (jnp.einsum("...r,...rd->...d", down_bias, up) + wrapper.up_bias[...])
        for layer in consumers:
            kernel = layer.kernel[...]
            bias_shift = jnp.einsum("...d,...de->...e", shift, kernel).astype(kernel.dtype)
            if layer.bias is None:
                layer.bias, layer.use_bias = nnx.Param(bias_shift), True
            else:
                layer.bias[...] = layer.bias[...] + bias_shift
            layer.kernel[...] = (kernel + s * (a @ (up @ kernel))).astype(kernel.dtype)
        replace_module(model, path, wrapper.base)


register(Method(
    name="repadapter",
    doc="RepAdapter: a linear grouped adapter after every block's norms, re-parameterised into the next layers.",
    trainable=lambda cfg: adapter_variables,
    surgery=repadapter_surgery,
    merge=repadapter_merge,
    archs=("vit",),
))
