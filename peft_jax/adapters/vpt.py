"""Visual Prompt Tuning (Jia et al. 2022): learned tokens inserted into the ViT's token sequence.

The prompts sit between the prefix (class) token and the patch tokens, ``[cls, P, patches]``.

- ``vpt_deep``: every block gets its own ``peft.num_tokens`` prompts; a block's prompt outputs
  are dropped, since the next block replaces them with its own (the paper's deep variant).
- ``vpt_shallow``: prompts enter before the first block and travel through all of them; they are
  dropped before the final norm (which acts per token), so class-token and GAP pooling both see
  the image tokens only. They live in the ViT's ``extra_tokens`` slot, outside the blocks, so a
  scanned model takes them too.

Prompts are initialised as in the paper: uniform in +-sqrt(6 / (3 * patch^2 + width)), Xavier
for the patch-embedding fan-in. ``peft.prompt_dropout`` drops prompt entries while training.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (
    AdapterParam, Method, adapter_dropout, adapter_variables, leading_shape, register, wrap_modules,
)
from peft_jax.errors import UserError
from peft_jax.models.init import draw
from peft_jax.models.vit import Block


def _prompts(model: nnx.Module, lead: tuple[int, ...], num_tokens: int, rngs: nnx.Rngs) -> AdapterParam:
    cfg = model.config
    bound = math.sqrt(6.0 / (3 * cfg.patch_size**2 + cfg.hidden_size))
    shape = lead + (num_tokens, cfg.hidden_size)
    return AdapterParam(draw(jax.random.uniform, rngs.params(), shape, -bound, bound))


class PromptedBlock(nnx.Module):
    """Runs ``base`` on ``[prefix, prompts, rest]``; ``keep`` says whether the prompt outputs stay in the sequence."""

    def __init__(self, base: nnx.Module, prompts: AdapterParam, *, prefix: int, keep: bool, dropout: nnx.Dropout):
        self.base = base
        self.prompts = prompts
        self.prefix = prefix
        self.keep = keep
        self.dropout = dropout

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.prompts[...]
        prompts = self.dropout(jnp.broadcast_to(p.astype(x.dtype), (x.shape[0],) + p.shape))
        x = jnp.concatenate([x[:, : self.prefix], prompts, x[:, self.prefix:]], axis=1)
        y = self.base(x)
        if self.keep:
            return y
        return jnp.concatenate([y[:, : self.prefix], y[:, self.prefix + p.shape[0]:]], axis=1)


class ShallowPrompts(nnx.Module):
    """VPT-shallow's tokens, held in the ViT's ``extra_tokens`` slot: inserted after the prefix
    before the first block, their outputs removed after the last (before the per-token final norm)."""

    def __init__(self, prompts: AdapterParam, dropout: nnx.Dropout):
        self.prompts = prompts
        self.dropout = dropout

    def insert(self, x: jax.Array, prefix: int) -> jax.Array:
        p = self.prompts[...]
        prompts = self.dropout(jnp.broadcast_to(p.astype(x.dtype), (x.shape[0],) + p.shape))
        return jnp.concatenate([x[:, :prefix], prompts, x[:, prefix:]], axis=1)

    def remove(self, x: jax.Array, prefix: int) -> jax.Array:
        return jnp.concatenate([x[:, :prefix], x[:, prefix + self.prompts.shape[0]:]], axis=1)


def _num_tokens(cfg: ml_collections.ConfigDict) -> int:
    n = int(cfg.num_tokens)
    if n < 1:
        raise UserError(f"peft.num_tokens must be a positive integer, got {cfg.num_tokens}")
    return n


def vpt_deep_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    n = _num_tokens(cfg)
    prefix = model.config.num_prefix_tokens

    def wrap(path, block: Block) -> PromptedBlock:
        lead = leading_shape(block.norm1.scale[...], 1)  # (depth,) for a scanned model
        dropout = adapter_dropout(model, float(cfg.prompt_dropout), rngs, what="vpt_deep (peft.prompt_dropout)")
        return PromptedBlock(block, _prompts(model, lead, n, rngs), prefix=prefix, keep=False, dropout=dropout)

    wrap_modules(model, (Block,), None, wrap, what="vpt_deep")


def vpt_shallow_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    n = _num_tokens(cfg)
    if getattr(model, "extra_tokens", False) is not None:
        raise UserError("vpt_shallow needs a ViT with a free extra_tokens slot (listed once in peft.method)")
    dropout = adapter_dropout(model, float(cfg.prompt_dropout), rngs, what="vpt_shallow (peft.prompt_dropout)",
                              inside_blocks=False)
    model.extra_tokens = ShallowPrompts(_prompts(model, (), n, rngs), dropout)


register(Method(
    name="vpt_deep",
    doc="VPT-deep: peft.num_tokens learned prompt tokens in front of the patches at every block.",
    trainable=lambda cfg: adapter_variables,
    surgery=vpt_deep_surgery,
    archs=("vit",),
))

register(Method(
    name="vpt_shallow",
    doc="VPT-shallow: peft.num_tokens learned prompt tokens in front of the patches at the first block.",
    trainable=lambda cfg: adapter_variables,
    surgery=vpt_shallow_surgery,
    archs=("vit",),
))
