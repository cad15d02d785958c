"""Convpass (Jie & Deng 2022): a convolutional bypass beside every attention and MLP sub-layer.

``x + attn(n1) + s * convpass(n1)`` with ``n1 = norm1(x)`` (and the same for the MLP), where
``convpass = up . dropout . act . conv3x3 . act . down`` and ``act`` is QuickGELU. The 3x3 conv
restores the image's spatial prior: patch tokens are laid out on their grid; a prefix (class)
token passes through the conv as a 1x1 image. Width ``peft.rank`` (8), scale ``peft.scale`` (1),
dropout ``peft.dropout`` (0.1). Initialisation as in the reference code: ``down``
Xavier-uniform, the conv an identity (centre tap), ``up`` zero. Not linear, so it does not merge.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import AdapterParam, Method, adapter_dropout, adapter_variables, is_scanned, register, wrap_modules
from peft_jax.errors import UserError
from peft_jax.models.init import draw
from peft_jax.models.vit import Attention, Mlp


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class ConvpassBranch(nnx.Module):
    """``base(x) + s * convpass(x)`` for a token sub-layer ``base`` (attention or MLP)."""

    def __init__(self, base: nnx.Module, lead: tuple[int, ...], dim: int, rank: int, *, prefix: int, scale: float,
                 dropout: nnx.Dropout, rngs: nnx.Rngs):
        bound = math.sqrt(6.0 / (dim + rank))
        self.base = base
        self.prefix = prefix
        self.scale = scale
        self.down_kernel = AdapterParam(draw(jax.random.uniform, rngs.params(), lead + (dim, rank), -bound, bound))
        self.down_bias = AdapterParam(jnp.zeros(lead + (rank,), jnp.float32))
        centre = jnp.zeros((3, 3, rank, rank), jnp.float32).at[1, 1].set(jnp.eye(rank))
        self.conv_kernel = AdapterParam(jnp.broadcast_to(centre, lead + centre.shape))
        self.conv_bias = AdapterParam(jnp.zeros(lead + (rank,), jnp.float32))
        self.up_kernel = AdapterParam(jnp.zeros(lead + (rank, dim), jnp.float32))
        self.up_bias = AdapterParam(jnp.zeros(lead + (dim,), jnp.float32))
        self.dropout = dropout

    def convpass(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        b, n, _ = x.shape
        h = quick_gelu(x @ self.down_kernel[...].astype(dt) + self.down_bias[...].astype(dt))
        grid = math.isqrt(n - self.prefix)
        if grid * grid != n - self.prefix:
            raise UserError(f"convpass: {n - self.prefix} patch tokens do not form a square grid")
        kernel, bias = self.conv_kernel[...].astype(dt), self.conv_bias[...].astype(dt)
        patches = h[:, self.prefix:].reshape(b, grid, grid, -1)
        patches = jax.lax.conv_general_dilated(patches, kernel, (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
        prefix = h[:, : self.prefix] @ kernel[1, 1]  # a 1x1 image sees only the centre tap
        h = jnp.concatenate([prefix, patches.reshape(b, grid * grid, -1)], axis=1) + bias
        h = self.dropout(quick_gelu(h))
        return h @ self.up_kernel[...].astype(dt) + self.up_bias[...].astype(dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.scale * self.convpass(x)


def convpass_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    rank = int(cfg.rank)
    if rank < 1:
        raise UserError(f"peft.rank must be a positive integer, got {cfg.rank}")
    scale = float(cfg.scale) if cfg.get("scale") is not None else 1.0
    rate = float(cfg.dropout) if cfg.get("dropout") is not None else 0.1
    prefix = model.config.num_prefix_tokens

    lead = (model.config.depth,) if is_scanned(model) else ()  # the stacked layer axis

    def wrap(path, m: nnx.Module) -> ConvpassBranch:
        dropout = adapter_dropout(model, rate, rngs, what="convpass (peft.dropout)")
        return ConvpassBranch(m, lead, model.config.hidden_size, rank, prefix=prefix, scale=scale,
                              dropout=dropout, rngs=rngs)

    wrap_modules(model, (Attention, Mlp), None, wrap, what="convpass")


register(Method(
    name="convpass",
    doc="Convpass: a 3x3-convolution bottleneck on the patch grid beside every attention and MLP sub-layer.",
    trainable=lambda cfg: adapter_variables,
    surgery=convpass_surgery,
    archs=("vit",),
))
