"""Adapter files, several adapters on one backbone, and LoRA export to Hugging Face peft."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from peft_jax.adapters import apply_peft, trainable_filter
from peft_jax.adapters.bank import AdapterBank
from peft_jax.adapters.export_hf import export_hf
from peft_jax.adapters.io import load_adapter, save_adapter, state_hash
from peft_jax.adapters.lora import DoRALinear
from peft_jax.config import base_config
from peft_jax.models import create_model, from_pretrained
from peft_jax.testing import nudge


def experiment(method="lora", **peft):
    c = base_config()
    c.model.name, c.model.image_size, c.model.patch_size, c.model.depth = "vit_ti16", 32, 8, 2
    c.peft.method = method
    c.peft.update(peft)
    return c


def backbone(seed=0, num_classes=2):
    return create_model("vit_ti16", num_classes=num_classes, image_size=32, patch_size=8, depth=2,
                        rngs=nnx.Rngs(seed))


def base_hash(model):
    return state_hash(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head")))))


def fine_tuned(cfg, seed=0, num_classes=2, key=7):
    """A backbone with the method's surgery whose trainable state (adapters and head) moved from its init."""
    model = backbone(seed, num_classes)
    h = base_hash(model)
    apply_peft(model, cfg.peft, rngs=nnx.Rngs(1))
    state = nnx.state(model, trainable_filter(cfg.peft))
    nudge(model, state, key, 0.1)
    model.eval()
    return model, h


X = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))


@pytest.mark.parametrize("method", ["lora", "vpt_deep+bitfit", "fact_tk"])
def test_adapter_reloads_onto_the_same_base_exactly(tmp_path, method):
    cfg = experiment(method)
    trained, h = fine_tuned(cfg)
    save_adapter(tmp_path, trained, trainable_filter(cfg.peft), config=cfg, base_hash=h)
    fresh = backbone()
    apply_peft(fresh, cfg.peft, rngs=nnx.Rngs(5))  # another adapter initialisation
    fresh.eval()
    assert not np.array_equal(fresh(X), trained(X))
    load_adapter(fresh, tmp_path, trainable_filter(cfg.peft), base_hash=base_hash(backbone()), peft_config=cfg.peft)
    np.testing.assert_array_equal(fresh(X), trained(X))


def test_adapter_on_another_base_or_config_is_an_error(tmp_path):
    cfg = experiment("lora")
    trained, h = fine_tuned(cfg)
    save_adapter(tmp_path, trained, trainable_filter(cfg.peft), config=cfg, base_hash=h)
    other = backbone(seed=1)
    other_hash = base_hash(other)
    apply_peft(other, cfg.peft, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="was trained on different base weights"):
        load_adapter(other, tmp_path, trainable_filter(cfg.peft), base_hash=other_hash, peft_config=cfg.peft)
    rank4 = experiment("lora", rank=4)
    model = backbone()
    apply_peft(model, rank4.peft, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"another PEFT config: peft.rank: adapter 8 vs 4"):
        load_adapter(model, tmp_path, trainable_filter(rank4.peft), base_hash=h, peft_config=rank4.peft)
    vpt = experiment("vpt_deep")
    model = backbone()
    apply_peft(model, vpt.peft, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"peft.method: adapter 'lora' vs 'vpt_deep'"):
        load_adapter(model, tmp_path, trainable_filter(vpt.peft), base_hash=h, peft_config=vpt.peft)


def test_adapter_bank_switches_adapters_and_heads_on_one_backbone(tmp_path):
    cfg = experiment("lora")
    derma, h = fine_tuned(cfg, num_classes=7, key=1)
    chest, _ = fine_tuned(cfg, num_classes=2, key=2)
    save_adapter(tmp_path / "derma", derma, trainable_filter(cfg.peft), config=cfg, base_hash=h)
    save_adapter(tmp_path / "chest", chest, trainable_filter(cfg.peft), config=cfg, base_hash=h)

    model = backbone()
    apply_peft(model, cfg.peft, rngs=nnx.Rngs(1))
    model.eval()
    frozen_before = nnx.state(model, nnx.All(nnx.Param, nnx.Not(trainable_filter(cfg.peft))))
    bank = AdapterBank(model, cfg.peft, base_hash=h)
    bank.load("derma", tmp_path / "derma")
    bank.load("chest", tmp_path / "chest")
    bank.add("new", 3, rngs=nnx.Rngs(0))
    assert bank.names == ["chest", "derma", "new"] and bank.active == "new"
    assert model(X).shape == (3, 3)

    step = nnx.jit(lambda m, x: m(x))
    for _ in range(2):
        for name, ref in (("derma", derma), ("chest", chest)):
            bank.switch(name)
            np.testing.assert_array_equal(step(model, X), step(ref, X))
    # Training one adapter in place is kept when switching away and back; the others are untouched.
    bank.switch("new")
    model.blocks[0].attn.query.lora_b[...] += 1.0
    trained_new = model(X)
    bank.switch("derma")
    np.testing.assert_array_equal(model(X), derma(X))
    bank.switch("new")
    np.testing.assert_array_equal(model(X), trained_new)
    # The frozen backbone is the same objects throughout: nothing was rebuilt or copied.
    frozen_after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(trainable_filter(cfg.peft))))
    for (_, a), (_, b) in zip(frozen_before.flat_state(), frozen_after.flat_state()):
        assert a.get_value() is b.get_value()

    other = experiment("lora")
    bad, bad_hash = fine_tuned(other, seed=3)
    save_adapter(tmp_path / "bad", bad, trainable_filter(other.peft), config=other, base_hash=bad_hash)
    with pytest.raises(ValueError, match="different base weights"):
        bank.load("bad", tmp_path / "bad")
    assert bank.names == ["chest", "derma", "new"] and bank.active == "new"
    np.testing.assert_array_equal(model(X), trained_new)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_export_loads_in_hugging_face_peft_with_the_same_logits(tmp_path, scan):
    from peft import PeftModel
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ref = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, image_size=32, patch_size=8, num_labels=3,
                                              layer_norm_eps=1e-6))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ref.eval().save_pretrained(tmp_path / "base")

    model = from_pretrained("vit_b16", tmp_path / "base", hidden_size=64, depth=2, num_heads=4, mlp_dim=128,
                            patch_size=8, scan_layers=scan)
    cfg = experiment("lora", targets="all", rank=4, alpha=8.0).peft
    apply_peft(model, cfg, rngs=nnx.Rngs(1))
    state = nnx.state(model, trainable_filter(cfg))
    nudge(model, state, 3, 0.2)
    model.eval()
    export_hf(model, cfg, tmp_path / "export")

    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    pixels = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        plain = ref(pixels).logits.numpy()
        expected = PeftModel.from_pretrained(ref, tmp_path / "export").eval()(pixels).logits.numpy()
    got = np.asarray(model(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(plain, expected, atol=1e-3)  # the adapter does change the logits


def test_export_refuses_other_methods(tmp_path):
    cfg = experiment("vpt_deep").peft
    model = apply_peft(backbone(), cfg, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"Hugging Face peft adapters are \['dora', 'ia3', 'lora'\] \(one at a time\)"):
        export_hf(model, cfg, tmp_path)


def test_dora_matches_hugging_face_peft():
    """DoRA's forward (normalised direction, learned magnitude) equals peft's on the same weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    ref = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    layer = ref.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    base.kernel[...] = jnp.asarray(layer.base_layer.weight.detach().numpy().T)
    base.bias[...] = jnp.asarray(layer.base_layer.bias.detach().numpy())
    dora = DoRALinear(base, 2, 4.0, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(dora.magnitude[...], np.linalg.norm(layer.base_layer.weight.detach().numpy(), axis=1),
                               rtol=1e-6)
    dora.lora_a[...] = jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T)
    dora.lora_b[...] = jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T)
    dora.magnitude[...] = jnp.asarray(layer.lora_magnitude_vector["default"].weight.detach().numpy())
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(dora(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


