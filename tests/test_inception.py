"""FID's Inception-v3: parity with pytorch-fid (random weights), the strict converter, the feature function,
statistics files and launch/fid.py on real chest X-rays."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from peft_jax.checkpoints import CheckpointError, KNOWN_CHECKPOINTS
from peft_jax.checkpoints.core import expected_shapes
from peft_jax.checkpoints.inception import torch_source
from peft_jax.metrics import feature_statistics, fid, frechet_distance, load_statistics, save_statistics
from peft_jax.metrics.inception import folder_features, image_files, inception_features, load_image, resize_bilinear
from peft_jax.models import from_pretrained
from peft_jax.models.inception import InceptionV3
from peft_jax.models.inception import resize_bilinear as network_resize

ROOT = pathlib.Path(__file__).resolve().parents[1]
URL = KNOWN_CHECKPOINTS["inception_v3.fid"].url


def torch_named(model: InceptionV3) -> dict[str, np.ndarray]:
    """Our model's variables under pytorch-fid's state-dict names and layouts (OIHW convs, (out, in) linear)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        a = np.asarray(var.get_value())
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a
        out[torch_source(path)[0]] = np.ascontiguousarray(a)
    return out


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """Random weights in pytorch-fid's names and layouts, made in numpy from our model's expected shapes:
    He-scaled convs (features of order 0.1), BatchNorm statistics and affine parameters neither 0 nor 1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for path, shape in expected_shapes(lambda r: InceptionV3(rngs=r)).items():
        key = torch_source(path)[0]
        if key.endswith("conv.weight"):  # HWIO -> OIHW
            a = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).transpose(3, 2, 0, 1)
        elif key == "fc.weight":
            a = rng.normal(0, 0.01, shape).T
        elif key.endswith(("bn.weight", "bn.running_var")):
            a = rng.uniform(0.8, 1.25, shape)
        else:  # BatchNorm shifts and means, the logits' bias
            a = rng.normal(0, 0.1, shape)
        arrays[key] = np.ascontiguousarray(a, np.float32)
    path = tmp_path_factory.mktemp("inception") / "inception_random.safetensors"
    save_file(arrays, str(path))
    return path, arrays


@pytest.fixture(scope="module")
def model(random_weights) -> InceptionV3:
    return from_pretrained("inception_v3_fid", random_weights[0])


def test_converter_loads_every_tensor_in_place(random_weights, model):
    arrays = random_weights[1]
    assert torch_named(model).keys() == arrays.keys() and len(arrays) == 472
    for key, a in torch_named(model).items():
        np.testing.assert_array_equal(a, arrays[key], err_msg=key)
    assert model.Mixed_7c.branch_pool.bn.use_running_average  # eval mode


def test_converter_reads_a_torch_state_dict(random_weights, tmp_path):
    """The published file's format: a .pth state dict with BatchNorm's num_batches_tracked (dropped on load)."""
    torch = pytest.importorskip("torch")
    arrays = random_weights[1]
    state = {k: torch.from_numpy(a) for k, a in arrays.items()}
    state.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(0) for k in arrays
                  if k.endswith("running_mean")})
    torch.save(state, tmp_path / "inception.pth")
    loaded = torch_named(from_pretrained("inception_v3_fid", tmp_path / "inception.pth"))
    assert all(np.array_equal(loaded[k], a) for k, a in arrays.items())


def test_converter_names_missing_unexpected_and_misshaped_keys(random_weights, tmp_path):
    _, arrays = random_weights
    bad = dict(arrays)
    del bad["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    bad["Mixed_5b.branch5x5_2.conv.weight"] = np.zeros((64, 48, 3, 3), np.float32)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    bad["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    bad["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # allowed: dropped
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        from_pretrained("inception_v3_fid", tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "missing keys (1):\n    Mixed_6c.branch7x7dbl_3.bn.running_var" in message
    assert "unexpected keys (1):\n    AuxLogits.fc.weight" in message
    assert "Mixed_5b.branch5x5_2.conv.weight -> Mixed_5b/branch5x5_2/conv/kernel: checkpoint (3, 3, 48, 64), " \
           "model (5, 5, 48, 64)" in message
    assert "fc.weight -> fc/kernel: checkpoint (2048, 1000), model (2048, 1008)" in message
    assert "Conv2d_1a_3x3" not in message


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFT_JAX_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=f"no such Inception weights file; download {URL} and pass its path, "
                                              f"or save it as {tmp_path}/cache/pt_inception-2015-12-05-6726825d.pth"):
        from_pretrained("inception_v3_fid", tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointError, match=f"download {URL} by hand and save it as {tmp_path}/cache/pt_incep"):
        from_pretrained("inception_v3_fid", "inception_v3.fid")


def test_features_of_uint8_and_float_images(model):
    features = inception_features(model, batch_size=2)
    # 299 px, the size of the folder test's batches: one compile for both
    images = np.random.default_rng(1).integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    got = features(images)  # two batches, the second padded
    assert got.shape == (3, 2048) and got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got).mean() > 1e-2  # the fixture's network does not collapse its input
    np.testing.assert_allclose(features(images.astype(np.float32) / 127.5 - 1), got, atol=1e-5)
    cancelled = 2 * np.trace(np.cov(got[:2], rowvar=False))  # what FID(x, x) subtracts to reach 0
    assert abs(fid([images[:2]], [images[:2]], features)) < 1e-5 * cancelled  # rank 1: sqrt of ~0 eigenvalues


def test_host_and_network_resize_match_torch_bilinear():
    """The host resize of image files and the network's own one are torch's F.interpolate(bilinear)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for h, w in ((40, 48), (512, 350), (299, 299)):
        image = rng.uniform(0, 1, (h, w, 3)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(299, 299),
                                               mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(resize_bilinear(image), want, atol=5e-7)
        np.testing.assert_allclose(np.asarray(network_resize(jnp.asarray(image[None])))[0], want, atol=5e-7)


def test_image_files_are_read_as_8_bit_rgb(tmp_path):
    from PIL import Image

    grey = np.arange(40 * 30, dtype=np.uint8).reshape(40, 30)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.shape == (299, 299, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, np.repeat(resize_bilinear(grey[..., None]), 3, axis=-1) / 127.5 - 1, atol=1e-6)
    Image.fromarray(grey.astype(np.uint16) * 64).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png: pixels of mode I;16 .* convert the images to 8 bits first"):
        load_image(tmp_path / "deep.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        load_image(tmp_path / "broken.jpg")


def test_statistics_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.standard_normal((10, 6)))
    save_statistics(tmp_path / "s.npz", mu, sigma, 10)
    got_mu, got_sigma = load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with np.load(tmp_path / "s.npz") as f:
        assert int(f["num_images"]) == 10
    (tmp_path / "text.npz").write_text("not numpy")
    np.savez(tmp_path / "keys.npz", mean=mu)
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
    np.savez(tmp_path / "nan.npz", mu=mu * np.nan, sigma=sigma)
    for name, match in (("text", "not a readable .npz"), ("keys", "needs arrays 'mu' and 'sigma', found \\['mean'\\]"),
                        ("shape", r"expected mu \(D,\) and sigma \(D, D\), got \(6,\) and \(3, 6\)"),
                        ("nan", "non-finite")):
        with pytest.raises(ValueError, match=match):
            load_statistics(tmp_path / f"{name}.npz")


def _fid_cli(*args: str, cache: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PEFT_JAX_TCMALLOC="0", PEFT_JAX_CACHE=str(cache), PEFT_JAX_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "launch" / "fid.py"), *args, "--noprogress"],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def xray_folders(shared_data, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """Two small folders of real chest X-rays (normal / pneumonia), with a subfolder and a non-image file."""
    root = tmp_path_factory.mktemp("xrays")
    folders = []
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((shared_data / "chest_xray" / "train" / label).iterdir())[:4]
        dest = root / label.lower()
        (dest / "sub").mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, (dest / "sub" if i % 2 else dest) / f.name)
        (dest / "notes.txt").write_text("ignored")
        folders.append(dest)
    return folders[0], folders[1]


def test_fid_cli_on_chest_xrays(xray_folders, random_weights, model, tmp_path):
    """One run gives a finite FID between the folders and saves the normal folder's statistics; the same
    folder's features computed here give an FID of ~0 against them."""
    normal, pneumonia = xray_folders
    run = _fid_cli(str(normal), str(pneumonia), "--weights", str(random_weights[0]), "--batch_size", "4",
                   "--save_stats", str(tmp_path / "normal.npz"), cache=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[0] == f"FID: {result['fid']:.4f}" and result["num_real"] == 4 and result["num_fake"] == 4
    assert np.isfinite(result["fid"]) and result["fid"] > 1e-3

    here = feature_statistics(folder_features(image_files(normal), inception_features(model, 2), batch_size=2,
                                                     progress=False))
    assert abs(frechet_distance(*load_statistics(tmp_path / "normal.npz"), *here)) < 1e-6 * result["fid"]


def test_fid_cli_errors(xray_folders, tmp_path):
    normal, _ = xray_folders
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "bad.npz").write_text("not numpy")
    cases = [
        ((str(tmp_path / "empty"), str(normal)), "no .png/.jpg/.jpeg images in it or its subfolders"),
        ((str(normal), str(normal)), f"download {URL} by hand and save it as {tmp_path}/pt_inception-2015-12-05"),
        ((str(tmp_path / "bad.npz"), str(normal)), "bad.npz: not a readable .npz statistics file"),
    ]
    for args, message in cases:
        run = _fid_cli(*args, cache=tmp_path)
        assert run.returncode == 2, run.stderr
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last


def _fid_reference_model(torch, torchvision, pfi):
    """pytorch-fid's FID Inception with random weights (its fid_inception_v3() without the download). BatchNorm
    statistics are those of a batch of images like the test's, and BN shifts lean positive: with unit-gain
    random layers the network multiplies fp32 rounding by ~1e4 and float32 parity would say nothing."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=True)
    for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pfi.FIDInceptionE_1(1280)), ("Mixed_7c", pfi.FIDInceptionE_2(2048))):
        setattr(net, name, block)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.5, 0.2)
                m.momentum = None  # the running statistics become those of the one batch below
                m.reset_running_stats()
        net.train()
        calibration = torch.rand(8, 3, 96, 80) * 2 - 1
        net(torch.nn.functional.interpolate(calibration, size=(299, 299), mode="bilinear", align_corners=False))
    return net.eval()


def test_parity_with_pytorch_fid(tmp_path, monkeypatch):
    """pool3 features and logits of pytorch-fid's InceptionV3([3]) on random images, from a .pth and a
    .safetensors file; in float64 the two agree to rounding, so any float32 difference is rounding too."""
    pfi = pytest.importorskip("pytorch_fid.inception")
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file as save_torch

    net = _fid_reference_model(torch, torchvision, pfi)
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: net)
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    save_torch({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "inception.safetensors"))

    model = from_pretrained("inception_v3_fid", tmp_path / "inception.pth")
    from_st = from_pretrained("inception_v3_fid", tmp_path / "inception.safetensors")
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(from_st))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))

    x01 = np.random.default_rng(4).uniform(0, 1, (4, 96, 80, 3)).astype(np.float32)  # pytorch-fid takes [0, 1]
    nchw = torch.from_numpy(x01).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = reference(nchw)[0][:, :, 0, 0].numpy()
        want_logits = net(torch.nn.functional.interpolate(nchw * 2 - 1, size=(299, 299), mode="bilinear",
                                                          align_corners=False)).numpy()
        want64 = reference.double()(nchw.double())[0][:, :, 0, 0].numpy()
    got, logits = nnx.jit(lambda m, x: m(x, with_logits=True))(model, jnp.asarray(x01 * 2 - 1))
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"pool3 max abs diff vs pytorch-fid (fp32): {diff:.2e} (features up to {np.abs(want).max():.2f}); "
          f"logits {float(np.abs(np.asarray(logits) - want_logits).max()):.2e}")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-3 * np.abs(want_logits).max(), rtol=0)

    with jax.enable_x64(True):
        state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(model))
        got64 = nnx.merge(nnx.graphdef(model), state64)(jnp.asarray(x01.astype(np.float64) * 2 - 1))
        diff64 = float(np.abs(np.asarray(got64) - want64).max())
    print(f"pool3 max abs diff vs pytorch-fid (fp64): {diff64:.2e}")
    assert diff64 < 1e-9
