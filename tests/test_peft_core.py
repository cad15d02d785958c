"""The PEFT core: registry, exact counts, the trainable filter driving the gradients, merging."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peft_jax.adapters import apply_peft, merge, param_report, trainable_filter
from peft_jax.config import base_config
from peft_jax.models import create_model
from peft_jax.testing import perturb_adapters
from peft_jax.train import optim, step as step_lib
from peft_jax.train.state import split_model


def peft_cfg(method, **kw):
    c = base_config().peft
    c.method = method
    c.update(kw)
    return c


def build(method, name="vit_ti16", abstract=False, **model_kw):
    cfg = peft_cfg(method)

    def make():
        m = create_model(name, num_classes=2, image_size=32, rngs=nnx.Rngs(0), **model_kw)
        return apply_peft(m, cfg, rngs=nnx.Rngs(1))

    model = nnx.eval_shape(make) if abstract else make()
    return model, cfg


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown PEFT method.*'lroa'.*Did you mean lora.*Valid names:.*ssf"):
        build("lroa")


def test_lora_on_vit_ti16_counts_exactly():
    model, cfg = build("lora", abstract=True)
    report = param_report(model, trainable_filter(cfg))
    # 12 blocks x {query, value} x (192x8 + 8x192) + 2-class head (192x2 + 2)
    assert report["trainable_params"] == 12 * 2 * (192 * 8 + 8 * 192) + (192 * 2 + 2) == 74_114
    assert report["groups"]["head"] == 386


@pytest.mark.parametrize("method,expected", [
    # ViT-B/16, 2-class head = 768*2 + 2 = 1,538
    ("linear", 1_538),
    ("lora", 294_912 + 1_538),
    # every bias: per block qkv+out (4x768) + fc1 (3072) + fc2 (768) + 2 LN (2x768); patch embed, final LN, head
    ("bitfit", 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768 + 768 + 1_538),
    ("ln_tune", 12 * 2 * 2 * 768 + 2 * 768 + 1_538),
    # SSF scale+shift after q, k, v, out, fc1, fc2, norm1, norm2 per block, patch embed and final norm
    ("ssf", 2 * (12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768 + 768) + 1_538),
    ("full", 85_800_194),
])
def test_vit_b16_trainable_counts(method, expected):
    cfg = peft_cfg(method)
    model = nnx.eval_shape(lambda: apply_peft(
        create_model("vit_b16", num_classes=2, image_size=224, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    assert param_report(model, trainable_filter(cfg))["trainable_params"] == expected


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("method", ["lora", "ssf", "lora+ssf", "ssf+lora", "lora+bitfit"])
def test_merge_keeps_outputs(method, scan):
    model, cfg = build(method, patch_size=8, depth=2, scan_layers=scan)
    model.head.kernel[...] = jax.random.normal(jax.random.key(3), model.head.kernel.shape)
    perturb_adapters(model)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    before = model(x)
    merge(model, cfg)
    after = model(x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(jnp.abs(before).max()))
    plain, _ = build("linear", patch_size=8, depth=2, scan_layers=scan)
    assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(nnx.state(model))


def grads_and_jaxpr(method):
    model, cfg = build(method, patch_size=8, depth=2)
    graph, _, trainable, frozen, rest = split_model(model, trainable_filter(cfg))
    batch = {"image": jnp.ones((2, 32, 32, 3)), "label": jnp.zeros((2,), jnp.int32)}

    def loss(trainable):
        m = nnx.merge(graph, trainable, frozen, rest)
        return step_lib.cross_entropy(m(batch["image"]), batch["label"], 0.0)

    grads = jax.grad(loss)(trainable)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable)
    return trainable, grads, str(jaxpr)


def test_gradients_exist_only_for_trainable_state():
    trainable, grads, _ = grads_and_jaxpr("lora")
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert paths == {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert all(p.startswith("head/") or p.endswith(("lora_a", "lora_b")) for p in paths)
    assert not any(p.endswith("kernel") and not p.startswith("head/") for p in paths)


def test_frozen_kernels_get_no_weight_gradient():
    """A linear probe's backward pass stops at the head: no matmul for any frozen kernel's gradient."""
    _, _, probe = grads_and_jaxpr("linear")
    _, _, full = grads_and_jaxpr("full")
    # Forward of 2 blocks: 4 attention projections + 2 MLP + 2 attention einsums per block, patch conv, head.
    assert probe.count("dot_general") == 2 * (6 + 2) + 1 + 1  # forward only + the head's weight gradient
    assert full.count("dot_general") > 2 * probe.count("dot_general")


def test_optimizer_state_only_for_trainable_and_grouped():
    """AdamW state for the trainable leaves only; train.lr_mults / wd_mults groups by regex: a multiplier of 0
    on the head freezes it while LoRA moves, and the default groups update exactly like one plain AdamW."""
    model, cfg = build("lora", patch_size=8, depth=2)
    _, _, trainable, _, _ = split_model(model, trainable_filter(cfg))
    train_cfg = base_config().train
    train_cfg.update(warmup_steps=0, grad_clip=0.0, schedule="constant")
    state = optim.make_optimizer(train_cfg).init(trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert n_opt == 2 * n_trainable  # AdamW: mu and nu, 8 bytes per trainable fp32 parameter
    grads = jax.tree.map(jnp.ones_like, trainable)
    plain = optax.adamw(train_cfg.lr, weight_decay=train_cfg.weight_decay, mask=optim.decay_mask)
    expected, _ = plain.update(grads, plain.init(trainable), trainable)
    got, _ = optim.make_optimizer(train_cfg).update(grads, state, trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)

    train_cfg.lr_mults = (("^head/", 0.0),)
    tx = optim.make_optimizer(train_cfg)
    labels = optim.group_labels(trainable, train_cfg)
    assert set(jax.tree.leaves(labels)) == {"lr0_wd1", "lr1_wd1"}
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(updates)}
    assert all(not u.any() for k, u in flat.items() if k.startswith("head/"))
    assert all(np.abs(u).min() > 0 for k, u in flat.items() if k.endswith(("lora_a", "lora_b")))
    with pytest.raises(ValueError, match="train.lr_mults: each entry must be"):
        train_cfg.lr_mults = (("^head/",),)
        optim.make_optimizer(train_cfg)
