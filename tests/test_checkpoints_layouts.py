"""timm, torchvision and Google .npz layouts: the same random torch weights, renamed into each
layout inside the test, must give the torch reference's logits.

The renaming here is written from the layouts' published key names; where timm or torchvision
is installed, the test also compares against those libraries' own models.
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

from peft_jax.checkpoints import CheckpointError
from peft_jax.models import from_pretrained
from peft_jax.testing import random_images as images, randomize_torch as randomize

TOL = dict(rtol=1e-4, atol=1e-4)
D, HEADS, DEPTH = 64, 4, 2
SMALL_VIT = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=128,
                 image_size=32, patch_size=8, layer_norm_eps=1e-6, num_labels=5)
SMALL_OVERRIDES = dict(hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_dim=128, patch_size=8)


def torch_out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return getattr(out, "logits", out).numpy()


def run(model: nnx.Module, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def on_disk_state(model, tmp_path_factory) -> dict[str, np.ndarray]:
    """The state dict under the names save_pretrained writes (transformers 5 renames in memory)."""
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return load_file(path / "model.safetensors")


# ---------------------------------------------------------------- ViT


def to_timm_vit(s: dict) -> dict:
    out = {
        "cls_token": s["vit.embeddings.cls_token"],
        "pos_embed": s["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": s["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": s["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": s["vit.layernorm.weight"], "norm.bias": s["vit.layernorm.bias"],
        "head.weight": s["classifier.weight"], "head.bias": s["classifier.bias"],
    }
    for i in range(DEPTH):
        h, t = f"vit.encoder.layer.{i}", f"blocks.{i}"
        for part in ("weight", "bias"):
            out[f"{t}.norm1.{part}"] = s[f"{h}.layernorm_before.{part}"]
            out[f"{t}.norm2.{part}"] = s[f"{h}.layernorm_after.{part}"]
            out[f"{t}.attn.qkv.{part}"] = np.concatenate(
                [s[f"{h}.attention.attention.{n}.{part}"] for n in ("query", "key", "value")])
            out[f"{t}.attn.proj.{part}"] = s[f"{h}.attention.output.dense.{part}"]
            out[f"{t}.mlp.fc1.{part}"] = s[f"{h}.intermediate.dense.{part}"]
            out[f"{t}.mlp.fc2.{part}"] = s[f"{h}.output.dense.{part}"]
    return out


def to_google_vit(s: dict) -> dict:
    hd = D // HEADS
    out = {
        "cls": s["vit.embeddings.cls_token"],
        "Transformer/posembed_input/pos_embedding": s["vit.embeddings.position_embeddings"],
        "embedding/kernel": s["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["vit.embeddings.patch_embeddings.projection.bias"],
        "Transformer/encoder_norm/scale": s["vit.layernorm.weight"],
        "Transformer/encoder_norm/bias": s["vit.layernorm.bias"],
        "head/kernel": s["classifier.weight"].T, "head/bias": s["classifier.bias"],
    }
    for i in range(DEPTH):
        h, g = f"vit.encoder.layer.{i}", f"Transformer/encoderblock_{i}"
        att = f"{g}/MultiHeadDotProductAttention_1"
        out[f"{g}/LayerNorm_0/scale"] = s[f"{h}.layernorm_before.weight"]
        out[f"{g}/LayerNorm_0/bias"] = s[f"{h}.layernorm_before.bias"]
        out[f"{g}/LayerNorm_2/scale"] = s[f"{h}.layernorm_after.weight"]
        out[f"{g}/LayerNorm_2/bias"] = s[f"{h}.layernorm_after.bias"]
        for n in ("query", "key", "value"):
            out[f"{att}/{n}/kernel"] = s[f"{h}.attention.attention.{n}.weight"].T.reshape(D, HEADS, hd)
            out[f"{att}/{n}/bias"] = s[f"{h}.attention.attention.{n}.bias"].reshape(HEADS, hd)
        out[f"{att}/out/kernel"] = s[f"{h}.attention.output.dense.weight"].T.reshape(HEADS, hd, D)
        out[f"{att}/out/bias"] = s[f"{h}.attention.output.dense.bias"]
        for hf_name, dense in (("intermediate", "Dense_0"), ("output", "Dense_1")):
            out[f"{g}/MlpBlock_3/{dense}/kernel"] = s[f"{h}.{hf_name}.dense.weight"].T
            out[f"{g}/MlpBlock_3/{dense}/bias"] = s[f"{h}.{hf_name}.dense.bias"]
    return out


@pytest.fixture(scope="module")
def timm_ref(tmp_path_factory):
    """Reference with timm's numerics (LayerNorm eps 1e-6, exact GELU) and its state dict."""
    ref = randomize(ViTForImageClassification(ViTConfig(**SMALL_VIT)), std=0.2)
    return ref, on_disk_state(ref, tmp_path_factory)


@pytest.fixture(scope="module")
def google_ref(tmp_path_factory):
    """Reference with vision_transformer's numerics (eps 1e-6, tanh-approximate GELU) and its state dict."""
    ref = randomize(ViTForImageClassification(ViTConfig(**SMALL_VIT, hidden_act="gelu_pytorch_tanh")), std=0.2)
    return ref, on_disk_state(ref, tmp_path_factory)


def test_timm_vit_safetensors_and_pth(timm_ref, tmp_path):
    state = {k: torch.from_numpy(v.copy()) for k, v in to_timm_vit(timm_ref[1]).items()}
    save_file(state, tmp_path / "vit.safetensors")
    torch.save(state, tmp_path / "vit.pth")
    x = images(2, 32)
    want = torch_out(timm_ref[0], x)
    for name in ("vit.safetensors", "vit.pth"):
        model = from_pretrained("vit_b16", tmp_path / name, **SMALL_OVERRIDES)
        assert model.config.layer_norm_eps == 1e-6 and not model.config.gelu_approximate
        np.testing.assert_allclose(run(model, x), want, **TOL)


def test_bfloat16_safetensors_are_read_as_float32(timm_ref, tmp_path):
    state = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in to_timm_vit(timm_ref[1]).items()}
    save_file(state, tmp_path / "vit_bf16.safetensors")
    model = from_pretrained("vit_b16", tmp_path / "vit_bf16.safetensors", **SMALL_OVERRIDES)
    assert model.blocks[0].mlp.fc1.kernel.dtype == jnp.float32
    np.testing.assert_array_equal(model.blocks[0].mlp.fc1.kernel[...], state["blocks.0.mlp.fc1.weight"].float().numpy().T)


def test_timm_fc_norm_average_pooling(timm_ref, tmp_path):
    """timm's fc_norm variant (MAE fine-tunes): class token kept, patch tokens averaged, then the LayerNorm.
    The torch reference is the same network's last block output, pooled and normalised by hand."""
    ref, on_disk = timm_ref
    state = {k: torch.from_numpy(v.copy()) for k, v in to_timm_vit(on_disk).items()}
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    save_file(state, tmp_path / "vit.safetensors")
    x = images(2, 32)
    with torch.no_grad():
        last = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), output_hidden_states=True).hidden_states[-1]
        pooled = torch.nn.functional.layer_norm(last[:, 1:].mean(1), (D,), state["fc_norm.weight"],
                                                state["fc_norm.bias"], eps=1e-6)
        want = (pooled @ state["head.weight"].T + state["head.bias"]).numpy()
    model = from_pretrained("vit_b16", tmp_path / "vit.safetensors", **SMALL_OVERRIDES)
    assert model.config.fc_norm and model.config.has_class_token and model.config.pool == "gap"
    np.testing.assert_allclose(run(model, x), want, **TOL)


def test_google_npz_with_head(google_ref, tmp_path):
    arrays = to_google_vit(google_ref[1])
    np.savez(tmp_path / "vit.npz", **arrays)
    np.savez(tmp_path / "vit_opt.npz", **{f"opt/target/{k}": v for k, v in arrays.items()})
    x = images(2, 32)
    want = torch_out(google_ref[0], x)
    for name in ("vit.npz", "vit_opt.npz"):
        model = from_pretrained("vit_b16", tmp_path / name, **SMALL_OVERRIDES)
        assert model.config.gelu_approximate and model.config.layer_norm_eps == 1e-6
        assert model.config.image_size == 32  # from the position-embedding grid
        np.testing.assert_allclose(run(model, x), want, **TOL)


def test_google_npz_without_head_and_with_pre_logits(google_ref, tmp_path):
    arrays = to_google_vit(google_ref[1])
    headless = {k: v for k, v in arrays.items() if not k.startswith("head/")}
    np.savez(tmp_path / "headless.npz", **headless)
    rng = np.random.default_rng(0)
    pre_logits = {**arrays, "pre_logits/kernel": rng.standard_normal((D, D)), "pre_logits/bias": np.zeros(D)}
    np.savez(tmp_path / "i21k.npz", **pre_logits)
    x = images(2, 32)
    with torch.no_grad():
        want = google_ref[0].vit(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state[:, 0].numpy()
    for name in ("headless.npz", "i21k.npz"):
        with pytest.raises(CheckpointError, match="pass num_classes"):
            from_pretrained("vit_b16", tmp_path / name, **SMALL_OVERRIDES)
        model = from_pretrained("vit_b16", tmp_path / name, num_classes=5, **SMALL_OVERRIDES)
        np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(x))), want, **TOL)


def test_google_npz_gap_model_and_head_count_check(google_ref, tmp_path):
    arrays = to_google_vit(google_ref[1])
    del arrays["cls"]
    pos = "Transformer/posembed_input/pos_embedding"
    arrays[pos] = arrays[pos][:, 1:]
    np.savez(tmp_path / "gap.npz", **arrays)
    model = from_pretrained("vit_b16", tmp_path / "gap.npz", **SMALL_OVERRIDES)
    assert model.config.pool == "gap" and not hasattr(model, "cls_token")
    assert run(model, images(1, 32)).shape == (1, 5)
    with pytest.raises(CheckpointError, match="checkpoint has 4 attention heads, model 8"):
        from_pretrained("vit_b16", tmp_path / "gap.npz", **{**SMALL_OVERRIDES, "num_heads": 8})


def test_google_npz_of_another_size_names_every_problem(google_ref, tmp_path):
    np.savez(tmp_path / "vit.npz", **to_google_vit(google_ref[1]))
    with pytest.raises(CheckpointError) as err:
        from_pretrained("vit_b16", tmp_path / "vit.npz", **{**SMALL_OVERRIDES, "depth": 3, "mlp_dim": 256})
    text = str(err.value)
    assert "missing keys" in text and "Transformer/encoderblock_2/LayerNorm_0/scale" in text
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel -> blocks/0/mlp/fc1/kernel: " \
           "checkpoint (64, 128), model (64, 256)" in text


# ---------------------------------------------------------------- ResNet


def to_torchvision_resnet(s: dict) -> dict:
    out = {}
    for k, v in s.items():
        k = k.removeprefix("resnet.")
        k = k.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        if k.startswith("encoder.stages."):
            _, _, stage, _, block, rest = k.split(".", 5)
            for hf, tv in (("shortcut.convolution", "downsample.0"), ("shortcut.normalization", "downsample.1")):
                rest = rest.replace(hf, tv)
            for j in range(3):
                rest = rest.replace(f"layer.{j}.convolution", f"conv{j + 1}")
                rest = rest.replace(f"layer.{j}.normalization", f"bn{j + 1}")
            k = f"layer{int(stage) + 1}.{block}.{rest}"
        out[k.replace("classifier.1", "fc")] = v
    return out


@pytest.fixture(scope="module")
def resnet50_ref(tmp_path_factory):
    ref = randomize(ResNetForImageClassification(ResNetConfig(num_labels=5)), std=0.05)
    state = {k: torch.from_numpy(v) for k, v in on_disk_state(ref, tmp_path_factory).items()}
    return ref, state


def test_torchvision_resnet50_pth_and_safetensors(resnet50_ref, tmp_path):
    state = to_torchvision_resnet(resnet50_ref[1])
    assert "layer2.0.downsample.1.running_var" in state and "fc.weight" in state
    torch.save(state, tmp_path / "resnet50.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "resnet50.safetensors")
    x = images(2, 64)
    want = torch_out(resnet50_ref[0], x)
    for name in ("resnet50.pth", "wrapped.pth", "resnet50.safetensors"):
        np.testing.assert_allclose(run(from_pretrained("resnet50", tmp_path / name), x), want, **TOL)


def test_torchvision_resnet_of_another_depth_is_refused(resnet50_ref, tmp_path):
    torch.save(to_torchvision_resnet(resnet50_ref[1]), tmp_path / "resnet50.pth")
    with pytest.raises(CheckpointError) as err:
        from_pretrained("resnet18", tmp_path / "resnet50.pth")
    text = str(err.value)
    assert "unexpected keys" in text and "layer1.0.conv3.weight" in text
    assert "layer1.0.conv1.weight -> layer1/0/conv1/kernel: checkpoint (1, 1, 64, 64), model (3, 3, 64, 64)" in text


class NotWeights:
    pass


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "payload": NotWeights()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not a plain torch state dict"):
        from_pretrained("resnet50", tmp_path / "evil.pth")
    np.savez(tmp_path / "evil.npz", a=np.array([NotWeights()], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        from_pretrained("vit_b16", tmp_path / "evil.npz")


# ---------------------------------------------------------------- the libraries themselves (optional)


def test_against_torchvision_itself(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    ref = randomize(torchvision.models.resnet50(num_classes=5), std=0.05)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    x = images(2, 64)
    np.testing.assert_allclose(run(from_pretrained("resnet50", tmp_path / "tv.pth"), x), torch_out(ref, x), **TOL)


def test_against_timm_itself(tmp_path):
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0, num_classes=5
    )
    ref = randomize(ref, std=0.2)
    save_file(dict(ref.state_dict()), tmp_path / "timm.safetensors")
    x = images(2, 32)
    model = from_pretrained("vit_b16", tmp_path / "timm.safetensors", **SMALL_OVERRIDES)
    np.testing.assert_allclose(run(model, x), torch_out(ref, x), **TOL)
