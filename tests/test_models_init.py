"""The bucketed initial draws (models/init.py) give exactly JAX's values, eager and traced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peft_jax.models.init import SMALLEST_BUCKET, draw, variance_scaling

SHAPES = [(3, 3, 40, 8), (7,), (1, 1, 96, 4), (0, 5), (SMALLEST_BUCKET + 3,)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bucketed_draw_equals_the_direct_draw(shape):
    key = jax.random.key(11)
    direct = jax.random.uniform(key, shape, jnp.float32, -0.3, 0.3)
    np.testing.assert_array_equal(np.asarray(draw(jax.random.uniform, key, shape, -0.3, 0.3)), np.asarray(direct))
    traced = jax.jit(lambda k: draw(jax.random.normal, k, shape))(key)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(jax.random.normal(key, shape, jnp.float32)))


@pytest.mark.parametrize("distribution", ["normal", "uniform", "truncated_normal"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_variance_scaling_equals_jax_bit_for_bit(mode, distribution):
    """The ResNet/EfficientNet kernels (kaiming fan_out normal, torch Linear's fan_in uniform), the diffusion
    models' (LeCun: fan_in truncated normal) and the rest."""
    ours, jax_init = variance_scaling(2.0, mode, distribution), jax.nn.initializers.variance_scaling(2.0, mode, distribution)
    for i, shape in enumerate([(3, 3, 16, 32), (5, 5, 1, 144), (1280, 2)]):
        key = jax.random.key(i)
        np.testing.assert_array_equal(np.asarray(ours(key, shape)), np.asarray(jax_init(key, shape, jnp.float32)))
    key, shape = jax.random.key(3), (1, 1, 96, 24)
    traced = jax.jit(lambda k: jax_init(k, shape, jnp.float32))(key)  # XLA fuses the scaling: 1 ulp off eager
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda k: ours(k, shape))(key)), np.asarray(traced))
    bf16 = ours(jax.random.key(0), (3, 4), jnp.bfloat16)  # other dtypes: JAX's own initialiser
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16, np.float32),
                                  np.asarray(jax_init(jax.random.key(0), (3, 4), jnp.bfloat16), np.float32))


def test_variance_scaling_names_an_unsupported_mode():
    with pytest.raises(ValueError, match="mode must be fan_in or fan_out, got 'fan_avg'"):
        variance_scaling(1.0, "fan_avg", "normal")
