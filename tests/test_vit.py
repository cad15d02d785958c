"""ViT structure: exact parameter counts, pooling, other input sizes, scan == loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.models import create_model


def count(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state))

# Published parameter counts with a 1000-class head (timm / transformers ViTForImageClassification).
PUBLISHED = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "vit_b32": 88_224_232,
    "vit_l16": 304_326_632,
    "vit_h14": 632_045_800,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, image_size=224, rngs=nnx.Rngs(0)))
    assert count(nnx.state(model, nnx.Param)) == PUBLISHED[name]


def test_gap_pooling_has_no_class_token():
    model = nnx.eval_shape(lambda: create_model("vit_b16", num_classes=1000, image_size=224, pool="gap",
                                                rngs=nnx.Rngs(0)))
    # No class token (768) and one position embedding fewer (768).
    assert count(nnx.state(model, nnx.Param)) == PUBLISHED["vit_b16"] - 2 * 768


def small(**kw):
    return create_model("vit_ti16", num_classes=3, image_size=32, patch_size=8, depth=3, rngs=nnx.Rngs(0), **kw)


def test_other_input_size_interpolates_position_embedding():
    model = small()
    model.head.kernel[...] = jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    assert model(jnp.ones((2, 32, 32, 3))).shape == (2, 3)
    assert model(jnp.ones((2, 48, 48, 3))).shape == (2, 3)  # 6x6 grid from a 4x4 embedding


def test_scanned_blocks_equal_python_loop():
    looped = small()
    scanned = small(scan_layers=True, remat=True)
    # Copy the loop's weights into the scan model, stacking the blocks on a leading axis.
    loop_state = nnx.state(looped, nnx.Param)
    scan_state = nnx.state(scanned, nnx.Param)
    flat_loop = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(loop_state)}
    for path, var in nnx.to_flat_state(scan_state):
        key = tuple(map(str, path))
        if key[0] == "blocks":
            var.set_value(jnp.stack([flat_loop[("blocks", str(i)) + key[1:]] for i in range(3)]))
        else:
            var.set_value(flat_loop[key])
    nnx.update(scanned, scan_state)
    looped.head.kernel[...] = jax.random.normal(jax.random.key(1), looped.head.kernel.shape)
    scanned.head.kernel[...] = looped.head.kernel[...]
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_allclose(scanned(x), looped(x), rtol=1e-5, atol=1e-5)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="Did you mean vit_b16.*Valid names:.*resnet50"):
        create_model("vit_b61", num_classes=2, rngs=nnx.Rngs(0))


def test_remat_without_scan_trains():
    from peft_jax.config import base_config
    from peft_jax import sharding as shd
    from peft_jax.train import builder, step as step_lib
    from peft_jax.train.state import setup

    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.model.patch_size, cfg.model.depth = "vit_ti16", 32, 8, 2
    cfg.model.remat = True
    cfg.train.warmup_steps = 0  # the first step moves the weights
    built = builder.build(cfg, 2)
    state = setup(cfg, built.model, built.trainable, shd.make_mesh(cfg.mesh))
    train_step = step_lib.compile_steps(state, cfg.train).train
    batch = {"image": jnp.ones((4, 32, 32, 3)), "label": jnp.zeros((4,), jnp.int32)}
    before = state.trainable["head"]["kernel"][...].copy()
    assert np.isfinite(float(state.advance(train_step, batch)["loss"]))
    assert not np.array_equal(state.trainable["head"]["kernel"][...], before)
