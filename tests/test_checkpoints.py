"""Hugging Face transformers checkpoints: logits parity with torch, head policy, errors.

Reference models are built from configs with random weights (no network), saved with
``save_pretrained`` and loaded with ``peft_jax.models.from_pretrained``.
"""
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification, ViTModel

from peft_jax.checkpoints import CheckpointError
from peft_jax.models import from_pretrained
from peft_jax.models.vit import resize_pos_embed
from peft_jax.testing import random_images as images, randomize_torch as randomize

TOL = dict(rtol=1e-4, atol=1e-4)
SMALL_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 image_size=32, patch_size=8)
SMALL_OVERRIDES = dict(hidden_size=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8)


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy()


def run(model: nnx.Module, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


@pytest.fixture(scope="module")
def hf_resnet50(tmp_path_factory):
    ref = randomize(ResNetForImageClassification(ResNetConfig(num_labels=5)), std=0.05)
    path = tmp_path_factory.mktemp("hf") / "resnet50"
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def hf_small_vit(tmp_path_factory):
    ref = randomize(ViTForImageClassification(ViTConfig(**SMALL_VIT, num_labels=5)), std=0.2)
    path = tmp_path_factory.mktemp("hf") / "vit_small"
    ref.save_pretrained(path)
    return ref, path


def test_hf_resnet50_logits_match_torch(hf_resnet50):
    ref, path = hf_resnet50
    model = from_pretrained("resnet50", path)
    assert model.num_classes == 5 and model.bn1.use_running_average  # returned in eval mode
    x = images(2, 64)
    want = torch_logits(ref, x)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(run(model, x), want, **TOL)


def test_hf_resnet18_basic_blocks_match_torch(tmp_path):
    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=3)
    ref = randomize(ResNetForImageClassification(config), std=0.05, seed=1)
    ref.save_pretrained(tmp_path)
    x = images(2, 48, seed=1)
    np.testing.assert_allclose(run(from_pretrained("resnet18", tmp_path), x), torch_logits(ref, x), **TOL)


def test_hf_small_vit_logits_match_torch(hf_small_vit):
    ref, path = hf_small_vit
    model = from_pretrained("vit_b16", path, **SMALL_OVERRIDES)
    assert model.config.layer_norm_eps == 1e-12 and not model.config.gelu_approximate  # transformers defaults
    x = images(3, 32)
    want = torch_logits(ref, x)
    np.testing.assert_allclose(run(model, x), want, **TOL)
    scanned = from_pretrained("vit_b16", path, **SMALL_OVERRIDES, scan_layers=True)
    np.testing.assert_allclose(run(scanned, x), want, **TOL)


def test_hf_vit_b16_logits_match_torch(tmp_path):
    ref = randomize(ViTForImageClassification(ViTConfig(layer_norm_eps=1e-6, num_labels=10)), std=0.03)
    ref.save_pretrained(tmp_path)
    model = from_pretrained("vit_b16", tmp_path)
    assert model.config.layer_norm_eps == 1e-6 and model.config.image_size == 224
    x = images(1, 224)
    np.testing.assert_allclose(run(model, x), torch_logits(ref, x), **TOL)


def test_new_head_when_class_count_differs(hf_small_vit, caplog):
    ref, path = hf_small_vit
    with caplog.at_level(logging.WARNING, logger="peft_jax.checkpoints"):
        model = from_pretrained("vit_b16", path, num_classes=7, rngs=nnx.Rngs(3), **SMALL_OVERRIDES)
    assert "new 7-class head" in caplog.text and "5 classes" in caplog.text
    assert model.head.kernel.shape == (64, 7)
    x = images(2, 32)
    with torch.no_grad():
        want = ref.vit(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(x))), want, **TOL)
    same = from_pretrained("vit_b16", path, num_classes=5, **SMALL_OVERRIDES)  # matching count: kept
    np.testing.assert_allclose(run(same, x), torch_logits(ref, x), **TOL)


def test_resnet_new_head_keeps_backbone(hf_resnet50):
    ref, path = hf_resnet50
    model = from_pretrained("resnet50", path, num_classes=2)
    assert model.head.kernel.shape == (2048, 2)
    x = images(1, 64)
    with torch.no_grad():
        want = ref.resnet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.flatten(1).numpy()
    # Un-normalised features reach ~100: compare relative to their scale.
    np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_headless_vit_model_needs_num_classes(tmp_path):
    ref = randomize(ViTModel(ViTConfig(**SMALL_VIT)), std=0.2)  # has a pooler, no head
    ref.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="has no classification head: pass num_classes"):
        from_pretrained("vit_b16", tmp_path, **SMALL_OVERRIDES)
    model = from_pretrained("vit_b16", tmp_path, num_classes=4, **SMALL_OVERRIDES)
    x = images(2, 32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(x))), want, **TOL)


def test_position_embeddings_resized_for_another_image_size(hf_small_vit, caplog):
    ref, path = hf_small_vit
    with caplog.at_level(logging.WARNING, logger="peft_jax.checkpoints"):
        model = from_pretrained("vit_b16", path, image_size=48, **SMALL_OVERRIDES)
    assert "resized from 32 px to 48 px" in caplog.text
    original = ref.vit.embeddings.position_embeddings.detach().numpy()
    want = resize_pos_embed(jnp.asarray(original), 6, 1)
    assert model.pos_embed.shape == (1, 37, 64)
    np.testing.assert_allclose(model.pos_embed[...], want, rtol=1e-6, atol=1e-6)
    assert run(model, images(1, 48)).shape == (1, 5)


# ---------------------------------------------------------------- errors


def _edit_weights(src, dst, edit):
    """Copies a Hugging Face directory with its safetensors state dict edited."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_missing_key_is_named(hf_small_vit, tmp_path):
    path = _edit_weights(hf_small_vit[1], tmp_path / "ckpt", lambda s: s.pop("vit.encoder.layer.1.output.dense.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    vit\.encoder\.layer\.1\.output\.dense\.bias"):
        from_pretrained("vit_b16", path, **SMALL_OVERRIDES)


def test_unexpected_key_is_named(hf_small_vit, tmp_path):
    def add(state):
        state["vit.encoder.layer.0.extra.weight"] = torch.zeros(3)

    path = _edit_weights(hf_small_vit[1], tmp_path / "ckpt", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    vit\.encoder\.layer\.0\.extra\.weight"):
        from_pretrained("vit_b16", path, **SMALL_OVERRIDES)


def test_wrong_shape_is_named(hf_small_vit, tmp_path):
    def shrink(state):
        state["vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(100, 64)

    path = _edit_weights(hf_small_vit[1], tmp_path / "ckpt", shrink)
    with pytest.raises(CheckpointError) as err:
        from_pretrained("vit_b16", path, **SMALL_OVERRIDES)
    assert ("vit.encoder.layer.0.intermediate.dense.weight -> blocks/0/mlp/fc1/kernel: "
            "checkpoint (64, 100), model (64, 128)") in str(err.value)


def test_wrong_architecture_is_an_error(hf_small_vit, hf_resnet50):
    with pytest.raises(CheckpointError, match="holds a resnet, but arch is vit_b16"):
        from_pretrained("vit_b16", hf_resnet50[1])
    with pytest.raises(CheckpointError, match="config.json does not describe the requested ViT: hidden_size=64"):
        from_pretrained("vit_l16", hf_small_vit[1])
    with pytest.raises(CheckpointError, match="config.json does not describe resnet101: depths"):
        from_pretrained("resnet101", hf_resnet50[1])
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        from_pretrained("resnet5", hf_resnet50[1])


def test_unreadable_inputs_are_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a registered checkpoint"):
        from_pretrained("resnet50", tmp_path / "nothing.pth")
    (tmp_path / "weights.h5").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        from_pretrained("resnet50", tmp_path / "weights.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained("resnet50", tmp_path / "empty")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="unrecognised key layout .*foo.weight"):
        from_pretrained("resnet50", tmp_path / "other.safetensors")
