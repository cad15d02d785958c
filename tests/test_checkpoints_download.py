"""The checkpoint registry and its verified download cache, against a local HTTP server and file:// URLs."""
import hashlib
import re

import numpy as np
import pytest
import torch

from peft_jax.checkpoints import KNOWN_CHECKPOINTS, CheckpointError, KnownCheckpoint, cache_dir, fetch, resolve_checkpoint
from peft_jax.models import FEATURE_ARCHS, MODEL_NAMES, from_pretrained


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("PEFT_JAX_CACHE", str(path))
    monkeypatch.delenv("PEFT_JAX_OFFLINE", raising=False)
    return path


def register(monkeypatch, name, url, sha256, arch="resnet18", filename="test.pth"):
    monkeypatch.setitem(KNOWN_CHECKPOINTS, name, KnownCheckpoint(arch, url, "torchvision", filename, sha256, "test"))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def torchvision_resnet18(path):
    """A random torchvision-layout ResNet-18 state dict, named as torchvision names it."""
    g = torch.Generator().manual_seed(0)
    state = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g) * 0.05, "fc.weight": torch.randn(3, 512, generator=g),
             "fc.bias": torch.zeros(3)}

    def bn(prefix, c):
        state.update({f"{prefix}.weight": torch.ones(c), f"{prefix}.bias": torch.zeros(c),
                      f"{prefix}.running_mean": torch.zeros(c), f"{prefix}.running_var": torch.ones(c),
                      f"{prefix}.num_batches_tracked": torch.tensor(0)})

    bn("bn1", 64)
    cin = 64
    for s, c in enumerate((64, 128, 256, 512)):
        for b in range(2):
            p = f"layer{s + 1}.{b}"
            state[f"{p}.conv1.weight"] = torch.randn(c, cin if b == 0 else c, 3, 3, generator=g) * 0.05
            state[f"{p}.conv2.weight"] = torch.randn(c, c, 3, 3, generator=g) * 0.05
            bn(f"{p}.bn1", c)
            bn(f"{p}.bn2", c)
            if b == 0 and s > 0:
                state[f"{p}.downsample.0.weight"] = torch.randn(c, cin, 1, 1, generator=g) * 0.05
                bn(f"{p}.downsample.1", c)
        cin = c
    torch.save(state, path)
    return path


def test_download_over_http_then_cache_reuse(http_server, cache, monkeypatch):
    root, url = http_server
    src = torchvision_resnet18(root / "r18.pth")
    register(monkeypatch, "test.r18", f"{url}/r18.pth", sha(src))
    model = from_pretrained("resnet18", "test.r18")
    assert model.head.kernel.shape == (512, 3)
    cached = cache / "test.pth"
    assert cached.read_bytes() == src.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["test.pth"]  # no partial files left

    src.unlink()  # the server no longer has it: the cached copy is used
    assert fetch("test.r18") == cached
    np.testing.assert_array_equal(from_pretrained("resnet18", "test.r18").head.kernel[...], model.head.kernel[...])


def test_sha256_mismatch_leaves_nothing_in_the_cache(http_server, cache, monkeypatch):
    root, url = http_server
    (root / "bad.pth").write_bytes(b"corrupted" * 1000)
    register(monkeypatch, "test.bad", f"{url}/bad.pth", "0" * 64)
    with pytest.raises(CheckpointError, match="sha256 mismatch .* the file was discarded"):
        fetch("test.bad", progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_file_url_and_torchvision_style_hash_prefix(tmp_path, cache, monkeypatch):
    src = tmp_path / "weights.pth"
    src.write_bytes(b"some bytes")
    register(monkeypatch, "test.prefix", src.as_uri(), sha(src)[:8])
    assert fetch("test.prefix", progress=False).read_bytes() == b"some bytes"


def test_offline_and_unreachable_errors_say_what_to_fetch_and_where(cache, monkeypatch):
    register(monkeypatch, "test.away", "http://127.0.0.1:9/away.pth", "0" * 64)  # port 9: nothing listens
    with pytest.raises(CheckpointError) as err:
        fetch("test.away", progress=False)
    message = str(err.value)
    assert "could not download" in message and "http://127.0.0.1:9/away.pth" in message
    assert str(cache / "test.pth") in message
    assert not cache.exists() or list(cache.iterdir()) == []

    monkeypatch.setenv("PEFT_JAX_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="PEFT_JAX_OFFLINE is set: download http://127.0.0.1:9/away.pth by hand"):
        fetch("test.away")


def test_a_file_without_a_known_sha256_is_never_downloaded(http_server, cache, monkeypatch):
    """No digest, no download: the error says where to get the file and where to put it; once placed, it is used."""
    root, url = http_server
    (root / "weights.pth").write_bytes(b"served bytes")
    register(monkeypatch, "test.unpinned", f"{url}/weights.pth", None)
    with pytest.raises(CheckpointError, match="no sha256 .* not downloaded automatically: download .*weights.pth by hand"):
        fetch("test.unpinned", progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "test.pth").write_bytes(b"placed by hand")
    assert fetch("test.unpinned").read_bytes() == b"placed by hand"


def test_resolve_paths_names_and_mistakes(tmp_path, cache):
    f = tmp_path / "mine.npz"
    f.write_bytes(b"x")
    assert resolve_checkpoint(f) == f and resolve_checkpoint(str(f)) == f
    with pytest.raises(CheckpointError, match="Did you mean vit_b16.augreg_in21k"):
        resolve_checkpoint("vit_b16.augreg_in21")
    with pytest.raises(CheckpointError, match="'resnet50.tv_in1k' is a resnet50, not a vit_b16"):
        resolve_checkpoint("resnet50.tv_in1k", arch="vit_b16")


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFT_JAX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "peft_jax"
    monkeypatch.setenv("PEFT_JAX_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_registry_entries_are_well_formed():
    assert {"vit_b16.i21k", "vit_l16.i21k", "vit_h14.i21k", "vit_b16.augreg_in21k", "vit_l16.augreg_in21k",
            "resnet50.tv_in1k", "resnet50.a1_in1k"} <= set(KNOWN_CHECKPOINTS)
    filenames = [c.filename for c in KNOWN_CHECKPOINTS.values()]
    assert len(set(filenames)) == len(filenames)
    for name, c in KNOWN_CHECKPOINTS.items():
        assert c.arch in MODEL_NAMES + FEATURE_ARCHS
        # the FID Inception's entry is named after the network, its arch after the FID variant of it
        assert name.startswith(c.arch.removesuffix("_fid") + ".")
        assert c.url.startswith("https://") and c.format in ("google_npz", "timm", "torchvision", "efficientnet_lite_pytorch")
        assert c.package is None or (c.sha256 and len(c.sha256) == 64)  # packaged weights: a full digest
        assert c.sha256 is None or re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{64}", c.sha256)
        if c.format == "torchvision":  # torchvision names its files by their sha256 prefix
            assert c.url.endswith(f"-{c.sha256}.pth")


def test_training_starts_from_a_registered_checkpoint(shared_data, tmp_path, cache, monkeypatch):
    """`init.checkpoint=<registered name>`: download (file://), verify, convert, fine-tune."""
    from peft_jax.adapters.io import read_adapter_config, state_hash
    from flax import nnx
    from peft_jax.config import base_config
    from peft_jax.train import classify

    src = torchvision_resnet18(tmp_path / "r18.pth")
    register(monkeypatch, "resnet18.test", src.as_uri(), sha(src))
    cfg = base_config()
    cfg.model.name, cfg.model.image_size = "resnet18", 32
    cfg.peft.method = "bn_tune"
    cfg.init.checkpoint = "resnet18.test"
    cfg.train.update(num_steps=3, batch_size=8, eval_every=3, progress=False)
    result = classify.train_and_evaluate(cfg, tmp_path / "run")
    assert result["trainable_params"] == 2 * 4800 + 512 * 2 + 2  # 4,800 BatchNorm channels in ResNet-18
    assert (cache / "test.pth").is_file()
    # The frozen backbone is the checkpoint's (its 3-class head was replaced by a 2-class one).
    loaded = from_pretrained("resnet18", cache / "test.pth", num_classes=2)
    backbone = nnx.state(loaded, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head"))))
    assert read_adapter_config(tmp_path / "run" / "adapter")["base_hash"] == state_hash(backbone)
