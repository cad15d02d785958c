"""FiLM (Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018)
as a PEFT method: a learned per-channel affine ``gamma * x + beta`` after every BatchNorm.

Here gamma and beta are task parameters learned directly rather than predicted from a
conditioning input. They start at the identity (gamma 1, beta 0), the starting point Perez
et al. obtain by predicting gamma as 1 + delta. Unlike ``bn_tune``, the BatchNorm's own
gamma and beta stay frozen and the new pair is a separate group of variables; being affine,
it folds into the BatchNorm (``merge``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from peft_jax.adapters.core import (AdapterParam, Method, adapter_variables, iter_wrapped, register, replace_module,
                                    wrap_modules)


class FiLM(nnx.Module):
    """``gamma * norm(x) + beta`` per channel."""

    def __init__(self, base: nnx.BatchNorm):
        self.base = base
        self.film_gamma = AdapterParam(jnp.ones((base.num_features,), jnp.float32))
        self.film_beta = AdapterParam(jnp.zeros((base.num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        return y * self.film_gamma[...].astype(y.dtype) + self.film_beta[...].astype(y.dtype)


def film_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    del cfg, rngs
    wrap_modules(model, (nnx.BatchNorm,), None, lambda path, m: FiLM(m), what="film")


def film_merge(model: nnx.Module) -> None:
    """BatchNorm scale * gamma, bias * gamma + beta."""
    for path, wrapper in iter_wrapped(model, FiLM):
        bn, gamma, beta = wrapper.base, wrapper.film_gamma[...], wrapper.film_beta[...]
        bn.bias[...] = (bn.bias[...] * gamma + beta).astype(bn.bias[...].dtype)
        bn.scale[...] = (bn.scale[...] * gamma).astype(bn.scale[...].dtype)
        replace_module(model, path, bn)


register(Method(
    name="film",
    doc="FiLM (Perez et al. 2018): a learned per-channel scale and shift after every BatchNorm.",
    trainable=lambda cfg: adapter_variables,
    surgery=film_surgery,
    merge=film_merge,
    archs=("cnn",),
))
