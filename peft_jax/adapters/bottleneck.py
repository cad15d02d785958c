"""Bottleneck adapters: ``up(act(down(h)))`` added to a hidden state, as their reference code defines them.

- ``adapter_houlsby`` (Houlsby et al. 2019; google-research/adapter-bert ``modeling.py``
  ``feedforward_adapter`` and ``optimization.py``): sequential, after the attention output
  projection and after the MLP (``h + adapter(h)`` on the output of ``attn/out`` and
  ``mlp/fc2``), BERT's tanh GELU, both projections truncated-normal with sigma 1e-3
  (``init_scale``), biases zero. The reference trains the adapters, every LayerNorm and the
  head; ``peft.adapter_norms=False`` leaves the LayerNorms frozen.
- ``adapter_pfeiffer`` (Pfeiffer et al. 2021): the same, after the MLP only, with ReLU, a
  truncated-normal down-projection (std 0.01) and a zero up-projection.
- ``adaptformer`` (Chen et al. 2022; ShoufaChen/AdaptFormer ``models/adapter.py`` and
  ``models/custom_modules.py``): parallel to the MLP sub-layer, reading the block's
  un-normalised hidden state: ``x + mlp(norm2(x)) + s * up(dropout(relu(down(x))))`` with
  ``s = peft.scale`` (0.1) and dropout ``peft.dropout`` (0.1, the reference block's
  ``Adapter(dropout=0.1)``); ``down`` Kaiming-uniform, ``up`` and the biases zero.

Width ``peft.bottleneck``; ``peft.activation`` (relu, gelu or gelu_tanh) overrides the
method's non-linearity. None of them is linear, so none merges.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (
    METHODS, AdapterParam, Method, adapter_dropout, adapter_variables, any_of, leading_shape, register,
    wrap_modules,
)
from peft_jax.errors import UserError
from peft_jax.models.init import draw
from peft_jax.models.vit import Block

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
# Each method's reference non-linearity (adapter-bert's ``gelu`` is the tanh approximation).
DEFAULT_ACTIVATION = {"adapter_houlsby": "gelu_tanh", "adapter_pfeiffer": "relu", "adaptformer": "relu"}
HOULSBY_INIT_SCALE = 1e-3  # adapter-bert's feedforward_adapter(init_scale=1e-3)


def _activation(cfg: ml_collections.ConfigDict, method: str) -> str:
    return str(cfg.activation) if cfg.get("activation") is not None else DEFAULT_ACTIVATION[method]


class Bottleneck(nnx.Module):
    """``up(dropout(act(down(x))))`` without the residual.

    ``init``: ``"houlsby"`` (both projections truncated-normal, sigma 1e-3), ``"near_identity"``
    (down truncated-normal with std 0.01, up zero) or ``"kaiming"`` (down Kaiming-uniform, up zero).
    """

    def __init__(self, lead: tuple[int, ...], dim: int, hidden: int, activation: str, init: str, *,
                 rngs: nnx.Rngs, dropout: nnx.Dropout | None = None):
        if activation not in ACTIVATIONS:
            raise UserError(f"peft.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden < 1:
            raise UserError(f"peft.bottleneck must be a positive integer, got {hidden}")
        self.activation = activation
        shape = lead + (dim, hidden)
        up = jnp.zeros(lead + (hidden, dim), jnp.float32)
        if init == "houlsby":  # TF's truncated_normal_initializer: a normal cut at two standard deviations
            down = HOULSBY_INIT_SCALE * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
            up = HOULSBY_INIT_SCALE * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, up.shape, jnp.float32)
        elif init == "near_identity":
            down = 0.01 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
        else:  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(dim)
            down = draw(jax.random.uniform, rngs.params(), shape, -bound, bound)
        self.down_kernel = AdapterParam(down)
        self.down_bias = AdapterParam(jnp.zeros(lead + (hidden,), jnp.float32))
        self.up_kernel = AdapterParam(up)
        self.up_bias = AdapterParam(jnp.zeros(lead + (dim,), jnp.float32))
        self.dropout = dropout if dropout is not None else nnx.Dropout(0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = ACTIVATIONS[self.activation](x @ self.down_kernel[...].astype(dt) + self.down_bias[...].astype(dt))
        return self.dropout(h) @ self.up_kernel[...].astype(dt) + self.up_bias[...].astype(dt)


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


def _linear_adapter(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, method: str, init: str):
    def wrap(path, m: nnx.Linear) -> SequentialAdapter:
        kernel = m.kernel[...]
        adapter = Bottleneck(leading_shape(kernel, 2), kernel.shape[-1], int(cfg.bottleneck), _activation(cfg, method),
                             init, rngs=rngs)
        return SequentialAdapter(m, adapter)

    return wrap


def houlsby_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    wrap_modules(model, (nnx.Linear,), r"(attn/out|mlp/fc2)$", _linear_adapter(cfg, rngs, "adapter_houlsby", "houlsby"),
                 what="adapter_houlsby")


def houlsby_trainable(cfg: ml_collections.ConfigDict):
    """adapter-bert's ``optimization.py`` trains the "adapters", "layer_norm" and "head" collections."""
    if cfg.get("adapter_norms", True):
        return any_of(adapter_variables, METHODS["ln_tune"].trainable(cfg))
    return adapter_variables


def pfeiffer_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    wrap_modules(model, (nnx.Linear,), r"mlp/fc2$", _linear_adapter(cfg, rngs, "adapter_pfeiffer", "near_identity"),
                 what="adapter_pfeiffer")


def adaptformer_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    scale = float(cfg.scale) if cfg.get("scale") is not None else 0.1
    rate = float(cfg.dropout) if cfg.get("dropout") is not None else 0.1

    def wrap(path, block: Block) -> AdaptFormerBlock:
        norm_scale = block.norm2.scale[...]
        dropout = adapter_dropout(model, rate, rngs, what="adaptformer (peft.dropout)")
        adapter = Bottleneck(leading_shape(norm_scale, 1), norm_scale.shape[-1], int(cfg.bottleneck),
                             _activation(cfg, "adaptformer"), "kaiming", rngs=rngs, dropout=dropout)
        return AdaptFormerBlock(block, adapter, scale)

    wrap_modules(model, (Block,), None, wrap, what="adaptformer")


register(Method(
    name="adapter_houlsby",
    doc="Houlsby adapters: a sequential bottleneck after attention and after the MLP of every block, and the "
        "LayerNorms (peft.adapter_norms), as adapter-bert.",
    trainable=houlsby_trainable,
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
    doc="AdaptFormer: a bottleneck parallel to every MLP, scaled by peft.scale (0.1), dropout peft.dropout (0.1).",
    trainable=lambda cfg: adapter_variables,
    surgery=adaptformer_surgery,
    archs=("vit",),
))
