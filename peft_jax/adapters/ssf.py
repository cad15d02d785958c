"""SSF (Lian et al. 2022): a learned per-channel scale and shift after chosen operations.

On ViT: after the patch embedding, every attention projection, both MLP layers and every
LayerNorm. On ResNet: after every convolution and BatchNorm, and on the pooled feature
before the head. Being affine, it folds into the preceding layer, or for the pooled feature
into the head (``merge``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from peft_jax.adapters.cnn import fold_into_head, wrap_pool
from peft_jax.adapters.core import AdapterParam, Method, adapter_variables, arch_family, iter_wrapped, leading_shape, register, replace_module, wrap_modules


def _out_features(module: nnx.Module) -> tuple[tuple[int, ...], int]:
    """(leading stacked axes, channels) of a module's output."""
    if isinstance(module, (nnx.Linear, nnx.Conv)):
        kernel = module.kernel[...]
        core = 2 if isinstance(module, nnx.Linear) else kernel.ndim
        return leading_shape(kernel, core), kernel.shape[-1]
    scale = module.scale[...]
    return leading_shape(scale, 1), scale.shape[-1]


class SSF(nnx.Module):
    """``base(x) * scale + shift`` per output channel."""

    def __init__(self, base: nnx.Module, *, init_std: float, rngs: nnx.Rngs, features: int | None = None):
        lead, dim = _out_features(base) if features is None else ((), features)
        self.base = base
        shape = lead + (dim,)
        scale_key, shift_key = rngs.params(), rngs.params()  # drawn either way: the stream stays where it was
        if init_std == 0.0:  # the identity start (CNNs): no random draw, whose per-shape compile costs ~0.1 s each
            self.ssf_scale = AdapterParam(jnp.asarray(np.ones(shape, np.float32)))
            self.ssf_shift = AdapterParam(jnp.asarray(np.zeros(shape, np.float32)))
            return
        self.ssf_scale = AdapterParam(1.0 + init_std * jax.random.normal(scale_key, shape, jnp.float32))
        self.ssf_shift = AdapterParam(init_std * jax.random.normal(shift_key, shape, jnp.float32))

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        y = self.base(x, *args, **kwargs)
        return y * self.ssf_scale[...].astype(y.dtype) + self.ssf_shift[...].astype(y.dtype)


def ssf_surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    family = arch_family(model)
    init_std = cfg.get("ssf_init_std")
    if init_std is None:
        init_std = 0.02 if family == "vit" else 0.0  # Lian et al. on ViT; identity start on CNNs
    types = (nnx.Linear, nnx.Conv, nnx.LayerNorm) if family == "vit" else (nnx.Conv, nnx.BatchNorm)
    wrap_modules(model, types, None, lambda path, m: SSF(m, init_std=float(init_std), rngs=rngs), what="ssf")
    if family == "cnn":
        wrap_pool(model, lambda pool: SSF(pool, init_std=float(init_std), rngs=rngs, features=model.num_features))


def _fold(param: nnx.Param, scale: jax.Array, shift: jax.Array | None) -> None:
    """param * scale (+ shift), broadcasting the channel axis last and stacked axes first."""
    value = param[...]
    lead = scale.ndim - 1
    shape = scale.shape[:lead] + (1,) * (value.ndim - lead - 1) + scale.shape[-1:]
    new = value * scale.reshape(shape)
    if shift is not None:
        new = new + shift.reshape(shape)
    param[...] = new.astype(value.dtype)


def ssf_merge(model: nnx.Module) -> None:
    for path, wrapper in iter_wrapped(model, SSF):
        base, scale, shift = wrapper.base, wrapper.ssf_scale[...], wrapper.ssf_shift[...]
        if path[0] == "pool":  # a ResNet's pooled feature: it feeds the head
            fold_into_head(model.head, jnp.diag(scale), shift)
        elif isinstance(base, (nnx.Linear, nnx.Conv)):
            _fold(base.kernel, scale, None)
            if base.bias is None:
                base.bias = nnx.Param(jnp.zeros(scale.shape, base.kernel[...].dtype))
                base.use_bias = True
            _fold(base.bias, scale, shift)
        else:  # LayerNorm / BatchNorm: gamma * s, beta * s + t
            _fold(base.scale, scale, None)
            _fold(base.bias, scale, shift)
        replace_module(model, path, base)


register(Method(
    name="ssf",
    doc="SSF: per-channel scale and shift after every linear/conv and norm layer.",
    trainable=lambda cfg: adapter_variables,
    surgery=ssf_surgery,
    merge=ssf_merge,
))
