"""Weights by Hugging Face Hub name, against a local fake Hub (peft_jax.testing.FakeHub): no network.

In-process tests point huggingface_hub's constants at the fake Hub and a temporary cache (the
library reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import); the launch test sets the
real environment variables in a subprocess.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save, save_file

from peft_jax.checkpoints import CheckpointError, KNOWN_CHECKPOINTS, KnownCheckpoint, fetch
from peft_jax.checkpoints.hub import HubName, parse_hub_name
from peft_jax.models import from_pretrained
from peft_jax.testing import FakeHub, randomize_torch as randomize

ROOT = pathlib.Path(__file__).resolve().parents[1]
X = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


def timm_vit_weights(width: int, depth: int, mlp: int, patch: int, image: int, classes: int, seed=0) -> dict:
    """A random timm VisionTransformer state dict (class token, no fc_norm)."""
    rng = np.random.default_rng(seed)

    def r(*shape, mean=0.0):
        return (mean + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    w = {"patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
         "cls_token": r(1, 1, width), "pos_embed": r(1, 1 + (image // patch) ** 2, width),
         "norm.weight": r(width, mean=1.0), "norm.bias": r(width), "head.weight": r(classes, width),
         "head.bias": r(classes)}
    for i in range(depth):
        b = f"blocks.{i}"
        w.update({f"{b}.norm1.weight": r(width, mean=1.0), f"{b}.norm1.bias": r(width),
                  f"{b}.attn.qkv.weight": r(3 * width, width), f"{b}.attn.qkv.bias": r(3 * width),
                  f"{b}.attn.proj.weight": r(width, width), f"{b}.attn.proj.bias": r(width),
                  f"{b}.norm2.weight": r(width, mean=1.0), f"{b}.norm2.bias": r(width),
                  f"{b}.mlp.fc1.weight": r(mlp, width), f"{b}.mlp.fc1.bias": r(mlp),
                  f"{b}.mlp.fc2.weight": r(width, mlp), f"{b}.mlp.fc2.bias": r(width)})
    return w


def timm_repo(architecture: str, weights: dict, **model_args) -> dict:
    config = {"architecture": architecture, "num_classes": len(weights["head.bias"]), "global_pool": "token",
              "model_args": model_args, "pretrained_cfg": {"tag": "test", "mean": [0.5] * 3, "std": [0.5] * 3}}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": save(weights)}


TIMM_TINY = timm_vit_weights(192, 2, 768, 8, 32, 3)


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    ref = randomize(ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=128, image_size=32, patch_size=8,
                                                        num_labels=3, layer_norm_eps=1e-6)), std=0.2).eval()
    path = tmp_path_factory.mktemp("hf") / "vit"
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def hub(hf_vit):
    server = FakeHub()
    server.add("acme/vit-tiny-timm", timm_repo("vit_tiny_patch8_224", TIMM_TINY, depth=2, img_size=32))
    server.add("acme/vit-small-hf", {f: (hf_vit[1] / f).read_bytes() for f in ("config.json", "model.safetensors")})
    server.add("acme/deit", timm_repo("deit_base_patch16_224", TIMM_TINY))
    server.add("acme/swin", {"config.json": b'{"model_type": "swin"}', "model.safetensors": save(TIMM_TINY)})
    yield server
    server.close()


@pytest.fixture
def hub_cache(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the fake Hub, with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("PEFT_JAX_OFFLINE", raising=False)
    return tmp_path / "hf"


def logits(model, x=X):
    return np.asarray(model(jnp.asarray(x)))


def test_hub_names_are_told_apart_from_paths_and_registry_names():
    assert parse_hub_name("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k") == HubName(
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert parse_hub_name("timm/resnet50.a1_in1k@0123abc") == HubName("timm/resnet50.a1_in1k", "0123abc")
    assert parse_hub_name("hf-hub:acme/x@v1.0") == HubName("acme/x", "v1.0")
    for not_hub in ("vit_b16.augreg_in21k", "efficientnet_lite0.in1k", "runs/model.safetensors", "ckpt/w.pth",
                    "/abs/dir/x", "runs/a/adapter", "./x/y", "~/x"):
        assert parse_hub_name(not_hub) is None, not_hub
    with pytest.raises(CheckpointError, match="write hf-hub:ORG/NAME"):
        parse_hub_name("hf-hub:just-a-name")


def test_timm_repo_by_name_equals_the_same_weights_loaded_locally(hub, hub_cache, tmp_path):
    save_file(TIMM_TINY, str(tmp_path / "local.safetensors"))
    local = from_pretrained("vit_ti16", tmp_path / "local.safetensors", depth=2, patch_size=8)
    by_name = from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm")  # depth, patch and pool from config.json
    assert by_name.config.depth == 2 and by_name.config.patch_size == 8 and by_name.config.image_size == 32
    want = logits(local)
    assert np.abs(want).max() > 0.1
    np.testing.assert_array_equal(logits(by_name), want)
    commit = hub.repos["acme/vit-tiny-timm"]["commit"]
    np.testing.assert_array_equal(logits(from_pretrained("vit_ti16", f"acme/vit-tiny-timm@{commit}")), want)
    with pytest.raises(CheckpointError, match="has no revision 'v9'"):
        from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm@v9")


def test_transformers_repo_by_name_matches_torch(hf_vit, hub, hub_cache):
    ref, path = hf_vit
    model = from_pretrained("vit_b16", "hf-hub:acme/vit-small-hf", hidden_size=64, num_heads=4, mlp_dim=128)
    assert model.config.depth == 2 and model.config.patch_size == 8  # read from config.json
    with torch.no_grad():
        want = ref(torch.from_numpy(X.transpose(0, 3, 1, 2).copy())).logits.numpy()
    np.testing.assert_allclose(logits(model), want, rtol=1e-4, atol=1e-4)


def test_tampered_download_and_tampered_cache_are_refused(hub, hub_cache):
    hub.tampered.add(("acme/vit-tiny-timm", "model.safetensors"))
    try:
        with pytest.raises(CheckpointError, match=r"hf-hub:acme/vit-tiny-timm: model.safetensors does not match "
                                                  r"the Hub's sha256 \(X-Linked-Etag\).*removed from the cache"):
            from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm")
        assert not [p for p in hub_cache.rglob("blobs/*") if len(p.name) == 64]  # nothing a rerun would trust
    finally:
        hub.tampered.clear()
    from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm")  # a clean download is accepted
    (blob,) = [p for p in hub_cache.rglob("blobs/*") if len(p.name) == 64]
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")  # the cache altered after the download
    with pytest.raises(CheckpointError, match="does not match the Hub's sha256"):
        from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm")


def test_offline_rerun_uses_the_cache_and_makes_no_request(hub, hub_cache, monkeypatch):
    from huggingface_hub import constants

    want = logits(from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    np.testing.assert_array_equal(logits(from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm")), want)
    assert len(hub.requests) == before
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        from_pretrained("vit_b16", "hf-hub:acme/vit-small-hf")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("PEFT_JAX_OFFLINE", "1")  # peft_jax's own offline switch covers the Hub too
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        from_pretrained("vit_b16", "hf-hub:acme/vit-small-hf")


def test_unsupported_or_mismatched_repositories_are_errors_naming_them(hub, hub_cache):
    with pytest.raises(CheckpointError, match="timm architecture 'deit_base_patch16_224' is not supported"):
        from_pretrained("vit_b16", "hf-hub:acme/deit")
    with pytest.raises(CheckpointError, match="transformers model_type 'swin' is not supported"):
        from_pretrained("vit_b16", "hf-hub:acme/swin")
    with pytest.raises(CheckpointError, match="hidden_size=192, vit_b16 has 768; use model.name=vit_ti16"):
        from_pretrained("vit_b16", "hf-hub:acme/vit-tiny-timm")
    with pytest.raises(CheckpointError, match="config.json has depth=2, the model asks depth=3"):
        from_pretrained("vit_ti16", "hf-hub:acme/vit-tiny-timm", depth=3)
    with pytest.raises(CheckpointError, match="hf-hub:acme/nothing: no such repository"):
        from_pretrained("vit_b16", "hf-hub:acme/nothing")


def test_registered_name_without_a_published_hash_comes_from_its_hub_repo(hub, hub_cache, monkeypatch):
    monkeypatch.setitem(KNOWN_CHECKPOINTS, "test.hub", KnownCheckpoint(
        "vit_ti16", "https://example.invalid/none.npz", "timm", "test.hub.npz", None, "test", hub="acme/vit-tiny-timm"))
    monkeypatch.setenv("PEFT_JAX_CACHE", str(hub_cache.parent / "peft_jax"))
    assert (fetch("test.hub") / "model.safetensors").is_file()
    monkeypatch.setitem(KNOWN_CHECKPOINTS, "test.pinned", KnownCheckpoint(
        "vit_ti16", "https://example.invalid/none.npz", "timm", "test.pinned.npz", None, "test",
        hub="acme/vit-tiny-timm", hub_sha256="0" * 64))
    with pytest.raises(CheckpointError, match="does not match the registry's pinned sha256"):
        fetch("test.pinned")
    assert all(c.hub for n, c in KNOWN_CHECKPOINTS.items()
               if c.arch.startswith(("vit", "resnet")) and c.sha256 is None and n != "vit_l16.augreg_in21k")


def test_train_py_starts_from_a_hub_name_and_refuses_a_tampered_file(hub, shared_data, tmp_path):
    """launch/train.py with --config.init.checkpoint=hf-hub:..., the real HF_* environment in a subprocess."""
    weights = timm_vit_weights(768, 1, 3072, 8, 32, 2, seed=1)
    hub.add("acme/vit-b-depth1", timm_repo("vit_base_patch8_224", weights, depth=1, img_size=32))
    hub.add("acme/vit-b-tampered", timm_repo("vit_base_patch8_224", weights, depth=1, img_size=32))
    hub.tampered.add(("acme/vit-b-tampered", "model.safetensors"))
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), PEFT_JAX_TCMALLOC="0",
               PEFT_JAX_DATA=str(shared_data))
    env.pop("HF_HUB_OFFLINE", None)

    def train(repo, workdir, **extra_env):
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs/vit_b_lora.py'}",
               f"--config.init.checkpoint=hf-hub:{repo}", "--config.model.depth=1", "--config.model.patch_size=8",
               "--config.model.image_size=32", "--config.train.num_steps=2", "--config.train.batch_size=8",
               "--config.train.eval_every=2", "--config.train.progress=False", f"--workdir={tmp_path / workdir}"]
        return subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra_env}, timeout=600)

    ok = train("acme/vit-b-depth1", "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    results = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert results["model"] == "vit_b16" and results["trainable_params"] == 2 * 8 * 768 * 2 + 768 * 2 + 2
    assert any((tmp_path / "hf_home" / "hub").glob("models--acme--vit-b-depth1/blobs/*"))

    bad = train("acme/vit-b-tampered", "bad")
    assert bad.returncode == 2 and not (tmp_path / "bad" / "results.json").exists()
    assert "error: hf-hub:acme/vit-b-tampered: model.safetensors does not match the Hub's sha256" in bad.stderr
