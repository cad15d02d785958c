"""Bottleneck adapters: ``up(act(down(h)))`` with a zero-initialised up-projection (identity at the start).

- ``adapter_houlsby`` (Houlsby et al. 2019): sequential, after the attention output projection
  and after the MLP (``h + adapter(h)`` on the output of ``attn/out`` and ``mlp/fc2``).
- ``adapter_pfeiffer`` (Pfeiffer et al. 2021): the same, after the MLP only.
- ``adaptformer`` (Chen et al. 2022): parallel to the MLP sub-layer, reading the block's
  un-normalised hidden state as the reference code does: ``x + mlp(norm2(x)) + s * adapter(x)``
  with ``s = peft.scale`` (default 0.1).

Width ``peft.bottleneck``, non-linearity ``peft.activation`` (relu or gelu). Houlsby's
down-projection is a normal with std 0.01 (his near-identity initialisation); AdaptFormer's is
Kaiming-uniform as in its reference code. None of them is linear, so none merges.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import AdapterParam, Method, adapter_variables, leading_shape, register, wrap_modules
from peft_jax.models.vit import Block

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class Bottleneck(nnx.Module):
    """``up(act(down(x)))`` without the residual; ``up`` starts at zero."""

    def __init__(self, lead: tuple[int, ...], dim: int, hidden: int, activation: str, down_init: str, *,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"peft.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden < 1:
            raise ValueError(f"peft.bottleneck must be a positive integer, got {hidden}")
        self.activation = activation
        shape = lead + (dim, hidden)
        if down_init == "houlsby":
            down = 0.01 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
        else:  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(dim)
            down = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        self.down_kernel = AdapterParam(down)
        self.down_bias = AdapterParam(jnp.zeros(lead + (hidden,), jnp.float32))
        self.up_kernel = AdapterParam(jnp.zeros(lead + (hidden, dim), jnp.float32))
        self.up_bias = AdapterParam(jnp.zeros(lead + (dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = ACTIVATIONS[self.activation](x @ self.down_kernel[...].astype(dt) + self.down_bias[...].astype(dt))
        return h @ self.up_kernel[...].astype(dt) + self.up_bias[...].astype(dt)


class SequentialAdapter(nnx.Module):
    """``h + adapter(h)`` on the output ``h`` of a linear layer."""

    def __init__(self, base: nnx.Linear, adapter: Bottleneck):
        self.base = base
        self.adapter = adapter

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.base(x)
        return h + self.adapter(h)


class AdaptFormerBlock(nnx.Module):
    """A pre-norm ViT block with a scaled bottleneck parallel to its MLP sub-layer."""

    def __init__(self, base: Block, adapter: Bottleneck, scale: float):
        self.base = base
        self.adapter = adapter
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        b = self.base
        x = x + b.attn(b.norm1(x))
        return x + b.mlp(b.norm2(x)) + self.scale * self.adapter(x)


def _linear_adapter(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    def wrap(path, m: nnx.Linear) -> SequentialAdapter:
        kernel = m.kernel[...]
        adapter = Bottleneck(leading_shape(kernel, 2), kernel.shape[-1], int(cfg.bottleneck), str(cfg.activation),
                             "houlsby", rngs=rngs)
        return SequentialAdapter(m, adapter)

    return wrap


def houlsby_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    wrap_modules(model, (nnx.Linear,), r"(attn/out|mlp/fc2)$", _linear_adapter(cfg, rngs), what="adapter_houlsby")


def pfeiffer_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    wrap_modules(model, (nnx.Linear,), r"mlp/fc2$", _linear_adapter(cfg, rngs), what="adapter_pfeiffer")


def adaptformer_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    scale = float(cfg.scale) if cfg.get("scale") is not None else 0.1

    def wrap(path, block: Block) -> AdaptFormerBlock:
        norm_scale = block.norm2.scale[...]
        adapter = Bottleneck(leading_shape(norm_scale, 1), norm_scale.shape[-1], int(cfg.bottleneck),
                             str(cfg.activation), "kaiming", rngs=rngs)
        return AdaptFormerBlock(block, adapter, scale)

    wrap_modules(model, (Block,), None, wrap, what="adaptformer")


register(Method(
    name="adapter_houlsby",
    doc="Houlsby adapters: a sequential bottleneck after attention and after the MLP of every block.",
    trainable=lambda cfg: adapter_variables,
    surgery=houlsby_surgery,
    archs=("vit",),
))

register(Method(
    name="adapter_pfeiffer",
    doc="Pfeiffer adapters: a sequential bottleneck after the MLP of every block.",
    trainable=lambda cfg: adapter_variables,
    surgery=pfeiffer_surgery,
    archs=("vit",),
))

register(Method(
    name="adaptformer",
    doc="AdaptFormer: a bottleneck parallel to every MLP, scaled by peft.scale (0.1).",
    trainable=lambda cfg: adapter_variables,
    surgery=adaptformer_surgery,
    archs=("vit",),
))
