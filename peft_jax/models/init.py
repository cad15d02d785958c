"""Random initialisation that compiles once per size bucket instead of once per shape.

XLA:CPU compiles every eager random draw for its exact shape (0.1-0.8 s each on a CPU core), so a CNN with
fifty distinct kernel shapes spends most of its construction compiling samplers (EfficientNet-Lite0: 18 s).
With JAX's partitionable threefry (its default) element i of a draw depends only on the key and i, so the
leading elements of a larger draw are exactly the direct draw's values; drawing a power of two (at least 2**16)
and keeping the leading elements compiles one sampler per size bucket.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


# Draws under 2**16 elements share one bucket: generating 65,536 values takes about 1 ms, a compile 0.1-0.8 s.
SMALLEST_BUCKET = 1 << 16


def _bucketed(key: jax.Array, n: int) -> bool:
    """Whether a draw of n elements can go through the bucket: eager, partitionable threefry, not empty."""
    return not isinstance(key, jax.core.Tracer) and jax.config.jax_threefry_partitionable and n > 0


def _leading(sample: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...], *args) -> np.ndarray:
    n = math.prod(shape)
    size = max(SMALLEST_BUCKET, 1 << (n - 1).bit_length())
    return np.asarray(sample(key, (size,), jnp.float32, *args))[:n].reshape(shape)


def draw(sample: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...], *args) -> jax.Array:
    """``sample(key, shape, float32, *args)`` (a ``jax.random`` sampler) with the same values, computed as the
    leading elements of a power-of-two draw; traced calls and the non-partitionable setting draw directly."""
    if not _bucketed(key, math.prod(shape)):
        return sample(key, shape, jnp.float32, *args)
    return jax.device_put(_leading(sample, key, shape, *args))  # jnp.asarray would compile a copy per shape


def _truncated_normal(key, shape, dtype):
    return jax.random.truncated_normal(key, -2, 2, shape, dtype)


# jax.nn.initializers.variance_scaling's draws and the factor each is multiplied by, from the variance.
_DISTRIBUTIONS = {
    "normal": (jax.random.normal, (), np.sqrt),
    "uniform": (jax.random.uniform, (-1,), lambda v: np.sqrt(np.float32(3) * v)),
    "truncated_normal": (_truncated_normal, (), lambda v: np.sqrt(v) / np.float32(.87962566103423978)),
}


def variance_scaling(scale: float, mode: str, distribution: str) -> Callable[..., jax.Array]:
    """``jax.nn.initializers.variance_scaling(scale, mode, distribution)`` (default axes: the last is the output,
    the one before it the input), bit-equal, drawn through the size bucket for float32 eager calls."""
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"variance_scaling: mode must be fan_in or fan_out, got {mode!r}")
    reference = jax.nn.initializers.variance_scaling(scale, mode, distribution)
    sample, args, factor = _DISTRIBUTIONS[distribution]

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        shape = tuple(shape)
        if len(shape) < 2 or jnp.dtype(dtype) != jnp.float32 or not _bucketed(key, math.prod(shape)):
            return reference(key, shape, dtype)
        receptive_field = math.prod(shape) / shape[-2] / shape[-1]
        fan = {"fan_in": shape[-2] * receptive_field, "fan_out": shape[-1] * receptive_field}[mode]
        return jax.device_put(_leading(sample, key, shape, *args) * factor(np.float32(scale / fan)))

    return init


# nnx.Linear's and nnx.Conv's default kernel initialiser, through the buckets: the diffusion models' dozens of
# distinct kernel shapes would each compile a sampler (a tiny test U-Net: 19 s of construction -> 1.6 s).
LECUN_NORMAL = variance_scaling(1.0, "fan_in", "truncated_normal")
