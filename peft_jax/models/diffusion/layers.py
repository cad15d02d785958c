"""Building blocks shared by the Stable Diffusion U-Net and VAE, as plain Flax NNX modules (NHWC).

Attribute names follow the diffusers checkpoints (``conv1``, ``time_emb_proj``, ``to_q``,
``group_norm``, ...), so the loader maps keys one to one and PEFT regexes read like the
papers that describe which layers they tune.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peft_jax.errors import UserError
from peft_jax.models.init import LECUN_NORMAL

Dtype = jnp.dtype
# nnx.Linear with its default kernel initialiser, drawn through models/init.py's size buckets (bit-equal).
linear = functools.partial(nnx.Linear, kernel_init=LECUN_NORMAL)


def conv(cin: int, cout: int, kernel: int, *, stride: int = 1, padding=None, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A conv with torch's symmetric padding (kernel // 2) unless told otherwise."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, rngs=rngs,
                    kernel_init=LECUN_NORMAL)


def group_norm(channels: int, groups: int, eps: float, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    if channels % groups:
        raise UserError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between, and a 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, *, groups: int, eps: float,
                 output_scale_factor: float = 1.0, dtype: Dtype, rngs: nnx.Rngs):
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(cin, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = linear(temb_channels, cout, dtype=dtype, rngs=rngs) if temb_channels else None
        self.norm2 = group_norm(cout, groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; the VAE pads only right and bottom (``padding=0`` in diffusers)."""

    def __init__(self, channels: int, *, padding: int, dtype: Dtype, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention over (B, N, heads * d) tensors; softmax in float32.

    ``mask`` broadcasts to (B, heads, Nq, Nk) and is True where attending is allowed.
    """
    b, nq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, nq, inner)


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections; cross-attention when given a context."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, *, qkv_bias: bool,
                 dtype: Dtype, rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(context_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(context_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = linear(inner, query_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))
