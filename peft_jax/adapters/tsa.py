"""TSA: task-specific adapters (Li, Liu & Bilen, "Cross-domain Few-shot Learning with
Task-specific Adapters", CVPR 2022), residual form.

Beside every k x k convolution of the residual blocks (as in the reference, which adapts the
3x3 ones and leaves the stem and the 1x1 projections alone) a parallel adapter reads the
convolution's input:

- ``peft.tsa_form="matrix"``: a 1x1 convolution with the same stride, initialised to the
  identity scaled by 1e-4 (rectangular where the channel counts differ);
- ``"channel"``: a per-channel scale, 1e-4 at start; where a convolution changes the channel
  count the reference uses the matrix form, and so do we.

The adapter has the connectivity of its convolution: beside EfficientNet's depth-wise
convolutions (the only k x k ones of an inverted-residual block) it is one weight per channel
in both forms, the 1x1 with the convolution's groups; a dense C x C map there would add
channel mixing the block does not have, at more parameters than the whole network
(docs/methods_cnn.md, EfficientNet).

``peft.tsa_alignment=True`` adds the pre-classifier alignment (beta): a square linear map of
the pooled feature, initialised to the identity, without bias.

The backbone's output is (nearly) unchanged at start, and every adapter is linear: the 1x1
folds into the centre tap of its convolution, the alignment into the head (``merge``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.cnn import (
    ParallelConv, fold_into_head, is_depthwise, merge_parallel, spatial_block_convs, wrap_pool,
)
from peft_jax.adapters.core import AdapterParam, Method, adapter_variables, iter_wrapped, register, replace_module
from peft_jax.errors import UserError

INIT_SCALE = 1e-4  # the reference's scale of the identity initialisation (residual adapters)
FORMS = ("matrix", "channel")


class TSAConv(ParallelConv):
    """A convolution with its task-specific residual adapter (alpha)."""


class Alignment(nnx.Module):
    """Pre-classifier alignment: pooled features times a learned (D, D) matrix, identity at start."""

    def __init__(self, base: nnx.Module, features: int):
        self.base = base
        self.tsa_beta = AdapterParam(jnp.eye(features, dtype=jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        return y @ self.tsa_beta[...].astype(y.dtype)


def tsa_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del rngs  # deterministic initialisation
    form = cfg.get("tsa_form") or "matrix"
    if form not in FORMS:
        raise UserError(f"peft.tsa_form must be one of {FORMS}, got {form!r}")
    targets = spatial_block_convs(model)
    if not targets:
        raise UserError("tsa: the model has no k x k convolution in its residual blocks")
    for path, conv in targets:
        cin, cout = conv.in_features, conv.out_features
        if form == "channel" and cin == cout or is_depthwise(conv):
            alpha = jnp.full((cout,), INIT_SCALE, jnp.float32)
        else:
            alpha = INIT_SCALE * jnp.eye(cin, cout, dtype=jnp.float32)
        replace_module(model, path, TSAConv(conv, alpha, what="tsa", path=path))
    if cfg.get("tsa_alignment"):
        wrap_pool(model, lambda pool: Alignment(pool, model.num_features))


def tsa_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, Alignment):
        fold_into_head(model.head, wrapper.tsa_beta[...], None)
        replace_module(model, path, wrapper.base)
    merge_parallel(model, TSAConv)


register(Method(
    name="tsa",
    doc="TSA (Li et al. 2022): a parallel 1x1 (peft.tsa_form='matrix') or channel-wise ('channel') adapter beside "
        "each k x k convolution of the residual blocks (channel-wise beside a depth-wise one); optional "
        "pre-classifier alignment (peft.tsa_alignment).",
    trainable=lambda cfg: adapter_variables,
    surgery=tsa_surgery,
    merge=tsa_merge,
    archs=("cnn",),
))
