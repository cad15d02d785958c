"""bfloat16 compute (train.compute_dtype='bfloat16'): bf16 products with float32 accumulation in
both passes, float32 master weights and gradients, and a ViT that trains in it on real data."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.config import base_config
from peft_jax.models import create_model
from peft_jax.models.precision import mixed_einsum
from peft_jax.train import builder, classify


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("...k,kn->...n", (2, 9, 48), (48, 32)),  # a linear layer on a float32 master weight
    ("bqhd,bkhd->bhqk", (2, 9, 3, 16), (2, 9, 3, 16)),  # attention logits
    ("bhqk,bkhd->bqhd", (2, 3, 9, 9), (2, 9, 3, 16)),  # attention output
])
def test_mixed_einsum_matches_float32_in_value_and_gradients(spec, shape_a, shape_b):
    a = jax.random.normal(jax.random.key(0), shape_a).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), shape_b)
    if len(shape_b) > 2:
        b = b.astype(jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(2), jnp.einsum(spec, a, b).shape)

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b) * cot)

    mixed = jax.jit(jax.value_and_grad(loss(lambda a, b: mixed_einsum(spec, a, b)), argnums=(0, 1)))
    def rounded(t):  # the bf16 operand the product sees, exactly, in float32
        return t.astype(jnp.bfloat16).astype(jnp.float32)

    exact = jax.value_and_grad(loss(lambda a, b: jnp.einsum(spec, rounded(a), rounded(b))), argnums=(0, 1))
    (value, grads), (ref_value, ref_grads) = mixed(a, b), exact(a, b)
    assert mixed_einsum(spec, a, b).dtype == jnp.float32
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)  # exact products, float32 sums
    for g, ref, operand in zip(grads, ref_grads, (a, b)):
        assert g.dtype == operand.dtype  # a float32 master weight gets a float32 gradient
        scale = float(jnp.abs(ref).max())
        assert float(jnp.abs(g.astype(jnp.float32) - ref).max()) < 2e-2 * scale  # one bf16 rounding of the cotangent


@pytest.mark.parametrize("dtypes", [dict(dtype="bfloat16"), dict(matmul_dtype="bfloat16")])
def test_bfloat16_vit_agrees_with_float32(dtypes):
    """The same weights in float32 and with bf16 activations and products, or bf16 products on
    float32 activations; logits agree to bf16 precision; parameters stay float32."""
    kw = dict(num_classes=3, image_size=32, patch_size=8, depth=2, rngs=nnx.Rngs(0))
    f32 = create_model("vit_ti16", **kw)
    bf16 = create_model("vit_ti16", **dtypes, **kw)
    f32.head.kernel[...] = jax.random.normal(jax.random.key(3), f32.head.kernel.shape) * 0.1
    nnx.update(bf16, nnx.state(f32))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    want = f32(x)
    got = nnx.jit(lambda m, x: m(x))(bf16, x)
    assert float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max()) + 1e-2
    products = jax.jit(lambda x: nnx.merge(*nnx.split(bf16))(x)).lower(x).as_text()
    assert "bf16" in products  # the products do run in bf16
    if "matmul_dtype" in dtypes:
        assert got.dtype == jnp.float32


def test_matmul_dtype_is_checked():
    c = base_config()
    c.model.name = "vit_ti16"
    c.train.matmul_dtype = "float16"
    with pytest.raises(ValueError, match="train.matmul_dtype must be unset, 'bfloat16'"):
        builder.model_overrides(c)
    c.model.name, c.train.matmul_dtype = "resnet18", "bfloat16"
    with pytest.raises(ValueError, match="implemented for ViTs only"):
        builder.model_overrides(c)


@pytest.mark.parametrize("dtypes", [dict(compute_dtype="bfloat16"), dict(matmul_dtype="bfloat16")])
def test_bfloat16_training_on_breastmnist(shared_data, tmp_path, dtypes):
    """A LoRA + full-attention-tuning run in bf16 through the train loop (XLA:CPU must run every
    bf16 x bf16 -> float32 product of the backward pass): the loss falls."""
    c = base_config()
    c.model.update(name="vit_ti16", image_size=28, patch_size=4, depth=2)
    c.dataset.name = "breastmnist"
    c.peft.method = "lora+attention_tune"
    c.train.update(num_steps=20, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1, eval_every=20, progress=False,
                   **dtypes)
    results = classify.train_and_evaluate(c, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert np.isfinite(results["test"]["macro_f1"])
