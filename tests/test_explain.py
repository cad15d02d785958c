"""Explanations: attribution maps, their scores against masks, masks in the evaluation frame, the command."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from peft_jax import adapters
from peft_jax.data import eval_batches
from peft_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, eval_mask
from peft_jax.data.splits import Split
from peft_jax.explain import attribution, scores
from peft_jax.explain.attribution import Explainer
from peft_jax.explain.masks import DatasetMasks, read_mask
from peft_jax.models import create_model

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# A position-aware small CNN on 32 px images whose label is the sign of one square's contents.

SIZE, SIDE = 32, 12
SQUARES = {"a": (2, 2), "b": (18, 18)}  # top-left corners; both squares carry an independent sign


def square_mask(name: str) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    y, x = SQUARES[name]
    mask[y:y + SIDE, x:x + SIDE] = True
    return mask


def square_data(n: int, label_square: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = 0.1 * rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)
    signs = {k: rng.choice([-1.0, 1.0], n) for k in SQUARES}
    for k, (y, x0) in SQUARES.items():
        x[:, y:y + SIDE, x0:x0 + SIDE, :] += signs[k][:, None, None, None].astype(np.float32)
    return x, (signs[label_square] > 0).astype(np.int32)


class SquareCNN(nnx.Module):
    """A 2x2 stride-2 convolution, a 1x1 convolution with a learned per-position bias (so that it can tell
    the squares apart), average pooling and a linear head. It declares its Grad-CAM layer as every CNN of
    the registry does: ``feature_map`` and ``logits_from_feature_map``."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Linear(12, 16, rngs=rngs)  # on 2x2 patches: the strided convolution as a product
        self.conv2 = nnx.Linear(16, 16, rngs=rngs)
        self.position_bias = nnx.Param(jnp.zeros((SIZE // 2, SIZE // 2, 16)))
        self.head = nnx.Linear(16, 2, rngs=rngs)

    def feature_map(self, x):
        n, h, w, c = x.shape
        patches = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)
        return nnx.relu(self.conv2(nnx.relu(self.conv1(patches))) + self.position_bias[...])

    def logits_from_feature_map(self, f):
        return self.head(f.mean(axis=(1, 2)))

    def __call__(self, x):
        return self.logits_from_feature_map(self.feature_map(x))


def train_square_cnn(label_square: str, steps: int = 120) -> SquareCNN:
    model = SquareCNN(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-2)
    x, y = square_data(1024, label_square, seed=1)

    @jax.jit
    def step(p, opt, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(xb), yb).mean()
        updates, opt = tx.update(jax.grad(loss)(p), opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(params)
    for i in range(steps):
        j = (i * 64) % len(x)
        params, opt = step(params, opt, x[j:j + 64], y[j:j + 64])
    nnx.update(model, params)
    return model


@pytest.fixture(scope="module")
def square_models():
    return {k: train_square_cnn(k) for k in SQUARES}


def test_attributions_find_the_square_that_decides_the_label(square_models):
    images, _ = square_data(32, "a", seed=7)  # the same test images for both models
    energy = {}
    for trained_on, model in square_models.items():
        explainer = Explainer(model, baseline=0.0, ig_steps=16)
        assert (explainer.logits(images).argmax(1) == square_data(32, trained_on, seed=7)[1]).mean() == 1.0
        predicted = explainer.logits(images).argmax(1)
        for method in ("gradcam", "ig"):
            maps = explainer(method, images, predicted)
            for square in SQUARES:
                inside = [scores.energy_in_mask(m, square_mask(square)) for m in maps]
                energy[trained_on, method, square] = np.mean(inside)
    chance = square_mask("a").mean()  # 0.14: what a uniform map scores
    for method in ("gradcam", "ig"):
        for own, other in (("a", "b"), ("b", "a")):
            assert energy[own, method, own] > 0.5, (method, own, energy)
            assert energy[other, method, own] < 2 * chance, (method, own, energy)


def test_integrated_gradients_complete_with_more_steps(square_models):
    model = square_models["a"]
    images, labels = square_data(4, "a", seed=3)
    baseline = 0.0
    logits = np.asarray(model(jnp.asarray(images)))[np.arange(4), labels]
    at_baseline = np.asarray(model(jnp.zeros_like(jnp.asarray(images))))[np.arange(4), labels]
    gaps = []
    for steps in (2, 16, 256):
        maps = Explainer(model, baseline=baseline, ig_steps=steps)("ig", images, labels)
        gaps.append(np.abs(maps.sum(axis=(1, 2)) - (logits - at_baseline)).max())
    difference = np.abs(logits - at_baseline).min()
    assert difference > 0.1
    assert gaps[0] > gaps[1] > gaps[2], gaps  # the midpoint rule converges (measured: 0.74, 0.13, 0.0006)
    assert gaps[2] < gaps[1] / 10 and gaps[2] < 0.02 * difference, (gaps, difference)


# ---------------------------------------------------------------------------------------------
# Registry models, adapted and merged.

def tiny_vit(**overrides):
    options = {**dict(num_classes=3, image_size=32, patch_size=8, depth=2), **overrides}
    return create_model("vit_ti16", rngs=nnx.Rngs(0), **options)


@pytest.fixture(scope="module")
def resnet18():
    """One ResNet-18 for the module (building one takes seconds); tests take copies."""
    model = create_model("resnet18", num_classes=3, rngs=nnx.Rngs(0))
    return lambda: nnx.clone(model)


def randomise(model, filt, seed: int, scale: float = 0.2) -> None:
    """Non-trivial adapter values (a fresh LoRA or SSF is the identity, so merged == unmerged trivially)."""
    state = nnx.state(model, filt)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))


def peft_cfg(**fields) -> ml_collections.ConfigDict:
    from peft_jax.config import base_config

    cfg = base_config().peft
    cfg.update(fields)
    return cfg


# Integrated gradients of the ResNet are left out: along the path from the baseline some ReLU inputs
# pass through zero, where the 1e-6 differences of merged weights flip a unit (seen: 5e-4 apart).
@pytest.mark.parametrize("arch,method,attributions", [
    ("vit", "lora", ("gradcam", "ig", "rollout")),
    ("resnet18", "ssf", ("gradcam", "gxi")),
])
def test_merged_and_unmerged_adapters_explain_alike(arch, method, attributions, resnet18):
    model = tiny_vit() if arch == "vit" else resnet18()
    cfg = peft_cfg(method=method)
    adapters.apply_peft(model, cfg, rngs=nnx.Rngs(1))
    randomise(model, adapters.trainable_filter(cfg), seed=2)
    size = 32 if arch == "vit" else 64  # a 2x2 last stage for the ResNet
    images = jax.random.normal(jax.random.key(3), (2, size, size, 3))
    targets = np.array([0, 2])
    unmerged = Explainer(model, ig_steps=8)
    maps = {m: unmerged(m, images, targets) for m in attributions}
    merged_model = adapters.merge(model, cfg)
    assert not nnx.state(merged_model, adapters.core.adapter_variables)  # nothing of the adapter left
    merged = Explainer(merged_model, ig_steps=8)
    for m in attributions:
        again = merged(m, images, targets)
        scale = np.abs(maps[m]).max()
        assert scale > 0, m
        np.testing.assert_allclose(again, maps[m], atol=1e-4 * scale, rtol=0, err_msg=m)


@pytest.mark.parametrize("name,options", [
    ("vit_ti16", dict(patch_size=8, depth=2)), ("vit_ti16", dict(patch_size=8, depth=2, pool="gap")),
    ("resnet18", {}), ("efficientnet_lite0", {}),
])
def test_grad_cam_layer_splits_the_forward_pass(name, options):
    """``logits_from_feature_map(feature_map(x))`` is ``model(x)`` operation for operation (the same jaxpr),
    for every family that declares the layer; abstract models, nothing is allocated or compiled."""
    model = nnx.eval_shape(lambda: create_model(name, num_classes=3, image_size=32, rngs=nnx.Rngs(0), **options))
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    whole = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)

    def split_forward(s, x):
        m = nnx.merge(graphdef, s)
        return m.logits_from_feature_map(m.feature_map(x))

    split = jax.make_jaxpr(split_forward)(state, x)
    assert str(split) == str(whole)


@pytest.mark.parametrize("method", ["convpass", "vpt_deep", "vpt_shallow"])
def test_rollout_through_adapters_that_wrap_attention_or_add_tokens(method):
    model = tiny_vit()
    cfg = peft_cfg(method=method, num_tokens=3)
    adapters.apply_peft(model, cfg, rngs=nnx.Rngs(1))
    randomise(model, adapters.trainable_filter(cfg), seed=2)
    images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    explainer = Explainer(model)
    for m in ("rollout", "gradcam"):
        maps = explainer(m, images, np.array([0, 1]))
        assert maps.shape == (2, 32, 32) and np.isfinite(maps).all() and maps.std() > 0, m


def test_rollout_of_one_block_is_its_attention_row():
    """Depth 1: rollout = 0.5 * head-mean attention + 0.5 * identity; the class token's row over the patches."""
    model = tiny_vit(depth=1, patch_size=16)  # a 2x2 patch grid
    model.eval()
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    block = model.blocks[0]
    h = block.norm1(model.tokens(x))
    q = block.attn.query(h).reshape(1, 5, 3, 64)
    k = block.attn.key(h).reshape(1, 5, 3, 64)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, axis=-1).mean(axis=1)[0]
    want = (0.5 * weights[0, 1:]).reshape(2, 2)  # off the diagonal, the identity adds nothing
    got = Explainer(model)("rollout", x, np.array([0]))[0]
    np.testing.assert_allclose(got[::16, ::16], jax.image.resize(want, (32, 32), "bilinear")[::16, ::16], atol=1e-6)


def test_unsupported_layers_are_named(resnet18):
    resnet = resnet18()
    assert "needs a ViT" in attribution.unsupported_reason(resnet, "rollout")
    scanned = tiny_vit(scan_layers=True)
    assert "scan_layers" in attribution.unsupported_reason(scanned, "gradcam")
    assert attribution.supported_methods(scanned) == ["gxi", "ig"]
    assert "model.remat=False" in attribution.unsupported_reason(tiny_vit(remat=True), "rollout")
    from peft_jax.explain.run import _check_methods

    with pytest.raises(ValueError, match="--method rollout cannot explain resnet18: attention rollout needs a ViT"):
        _check_methods(resnet, "resnet18", ["gradcam", "rollout"])
    assert _check_methods(resnet, "resnet18", None) == ["gradcam", "gxi", "ig"]
    plain = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    assert "declares no Grad-CAM layer" in attribution.unsupported_reason(plain, "gradcam")
    with pytest.raises(ValueError, match="baseline"):
        attribution.baseline_image("white", (1, 2, 2, 3))


# ---------------------------------------------------------------------------------------------
# Scores.

def test_scores_against_hand_computed_values():
    a = np.array([[3.0, -1.0, 0.0],
                  [1.0, 2.0, -2.0]])
    mask = np.array([[True, False, False],
                     [False, True, False]])
    s = scores.image_scores(a, mask)
    assert s["energy"] == pytest.approx(5.0 / 6.0)  # positive mass 3 + 1 + 2, inside 3 + 2
    assert s["pointing"] == 1.0  # the maximum (3) is inside
    # inside {3, 2} vs outside {-1, 0, 1, -2}: every inside value beats every outside one
    assert s["auroc"] == pytest.approx(1.0)
    ties = np.array([[1.0, 1.0], [0.0, 1.0]])
    tmask = np.array([[True, False], [False, False]])
    # inside {1} vs outside {1, 0, 1}: wins 1, ties 2 -> (1 + 0.5 * 2) / 3
    assert scores.mask_auroc(ties, tmask) == pytest.approx(2.0 / 3.0)
    # the scores read the positive part: signed, inside {-1} beats {-3, -2} (AUROC 2/3); positive, {0} ties
    # with two zeros and loses to 2 (1/3)
    signed = np.array([[-1.0, -3.0], [2.0, -2.0]])
    corner = np.array([[True, False], [False, False]])
    assert scores.mask_auroc(signed, corner) == pytest.approx(2.0 / 3.0)
    assert scores.image_scores(signed, corner)["auroc"] == pytest.approx(1.0 / 3.0)
    assert np.isnan(scores.image_scores(-np.ones((2, 2)), corner)["pointing"])  # no positive evidence anywhere
    assert scores.pointing_hit(np.array([[0.0, 5.0]]), np.array([[True, False]])) == 0.0
    assert np.isnan(scores.energy_in_mask(-np.ones((2, 2)), np.eye(2, dtype=bool)))
    assert np.isnan(scores.pointing_hit(np.zeros((2, 2)), np.eye(2, dtype=bool)))
    assert np.isnan(scores.mask_auroc(a, np.ones_like(mask)))
    np.testing.assert_array_equal(scores.average_ranks([2.0, 1.0, 2.0, 5.0]), [2.5, 1.0, 2.5, 4.0])


def test_bootstrap_intervals_are_seeded_and_cover_the_mean():
    values = [0.1, 0.9, 0.5, 0.7, None, 0.3]  # None (an undefined score) is left out
    a = scores.bootstrap_ci(values, seed=1)
    assert a == scores.bootstrap_ci(values, seed=1)
    assert a != scores.bootstrap_ci(values, seed=2)
    assert a["n"] == 5 and a["mean"] == pytest.approx(0.5)
    assert 0.1 < a["ci_low"] < 0.5 < a["ci_high"] < 0.9
    constant = scores.bootstrap_ci([0.4] * 7)
    assert constant["n"] == 7 and [constant[k] for k in ("mean", "ci_low", "ci_high")] == pytest.approx([0.4] * 3)
    assert scores.bootstrap_ci([None])["n"] == 0


def test_overlay_captions_name_an_undefined_energy():
    """A map with no positive mass (one of the 2% BitFit ViT's on HAM10000) has no energy to print."""
    from peft_jax.explain.run import caption

    image = {"id": "ISIC_0024306", "predicted": "nv"}
    assert caption(image, 0.4567) == "0024306 nv E=0.46"
    assert caption(image, None) == "0024306 nv E=n/a"


# ---------------------------------------------------------------------------------------------
# Masks follow the evaluation transform.

def blob(h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    cy, cx, ry, rx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, 0.25 * h, 0.2 * w
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


@pytest.mark.parametrize("size", [32, 224])
def test_masks_take_the_eval_images_geometry(size):
    """An image that *is* its mask (white inside) goes through the real evaluation pipeline; the mask's
    evaluation view must be exactly where the image is white. A crop or shift on one side only fails."""
    masks = [blob(150, 200, s) for s in range(3)]
    images = np.stack([np.repeat(np.where(m, 255, 0).astype(np.uint8)[..., None], 3, axis=-1) for m in masks])
    batch = next(eval_batches(Split(images, np.zeros(3)), batch_size=3, image_size=size))
    white = (batch["image"][..., 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) > 0.5
    views = np.stack([eval_mask(m, size) for m in masks])
    np.testing.assert_array_equal(views, white)
    assert views.mean() > 0.05
    shifted = np.roll(views, 2, axis=2)
    assert (shifted != white).mean() > 0.005


def test_palette_masks_with_inverted_palettes_read_right(tmp_path):
    m = blob(15, 20, 0)
    Image.fromarray(np.where(m, 255, 0).astype(np.uint8)).save(tmp_path / "grey.png")
    inverted = Image.fromarray(np.where(m, 0, 1).astype(np.uint8), mode="P")  # index 0 is white
    inverted.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    inverted.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "grey.png"), m)
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png"), m)  # index 0 is the lesion, white
    assert Image.open(tmp_path / "palette.png").mode == "P"


HAM_FULL = pathlib.Path(os.environ.get("PEFT_JAX_DATA", "/nonexistent")) / "ham10000_full"


@pytest.mark.skipif(not (HAM_FULL / "masks").is_dir(), reason="needs $PEFT_JAX_DATA/ham10000_full (with masks)")
def test_real_ham10000_masks_sit_on_the_lesions_in_the_eval_view():
    """In 9,403 of 9,792 HAM10000 masks the lesion is darker than the skin around it: in the 64 px
    evaluation view the masked pixels of the real images are darker for nearly all of 40 images, and
    less so with the mask moved by a quarter of the frame."""
    from peft_jax.data.pipeline import resize

    masks = DatasetMasks(ml_collections.ConfigDict({"name": "ham10000", "manual_dir": str(HAM_FULL)}))
    ids = sorted(p.name.removesuffix("_segmentation.png") for p in (HAM_FULL / "masks").iterdir())[::240][:40]
    aligned, moved = [], []
    for image_id in ids:
        path = next(HAM_FULL.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
        image = np.asarray(Image.open(path).convert("RGB"))
        grey = resize(image, 64).astype(np.float32).mean(axis=-1)
        mask = masks.eval_view(image_id, image.shape[:2], 64)
        if 0.02 < mask.mean() < 0.9:
            aligned.append(grey[~mask].mean() - grey[mask].mean())
            off = np.roll(mask, 16, axis=(0, 1))
            moved.append(grey[~off].mean() - grey[off].mean())
    assert len(aligned) > 30
    assert np.mean(np.array(aligned) > 0) > 0.85
    assert np.mean(aligned) > 2 * np.mean(moved)


# ---------------------------------------------------------------------------------------------
# A HAM10000-shaped release (synthetic lesions with masks), a tiny training run and the command.

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def make_ham_release(root: pathlib.Path, per_class: int = 6) -> pathlib.Path:
    """Dark elliptical lesions on skin, 200x150 JPEGs with their masks (some as inverted-palette PNGs)."""
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for c, dx in enumerate(CLASSES):
        for j in range(per_class):
            image_id = f"ISIC_{c * 100 + j:07d}"
            m = blob(150, 200, c * 100 + j)
            skin = np.array([200, 150, 130]) + rng.normal(0, 10, (150, 200, 3))
            image = np.where(m[..., None], skin * (0.3 + 0.08 * c), skin)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / "HAM10000_images_part_1" / f"{image_id}.jpg", quality=95)
            if j == 0:
                mask = Image.fromarray(np.where(m, 0, 1).astype(np.uint8), mode="P")
                mask.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
            else:
                mask = Image.fromarray(np.where(m, 255, 0).astype(np.uint8))
            mask.save(root / "masks" / f"{image_id}_segmentation.png")
            rows.append({"lesion_id": f"HAM_{c * 100 + j:07d}", "image_id": image_id, "dx": dx, "dx_type": "histo",
                         "age": "50", "sex": "male", "localization": "back"})
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def run_launch(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFT_JAX_TCMALLOC": os.environ.get("PEFT_JAX_TCMALLOC", "1")}
    env.pop("PEFT_JAX_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def ham_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ham")
    release = make_ham_release(tmp / "release")
    workdir = tmp / "run"
    proc = run_launch("train.py", "--config", str(REPO / "configs" / "vit_b_lora.py"), "--config.model.name=vit_ti16",
                      "--config.dataset.name=ham10000", f"--config.dataset.manual_dir={release}",
                      f"--config.dataset.data_dir={tmp / 'tfds'}",
                      "--config.model.image_size=32", "--config.model.patch_size=8", "--config.model.depth=2",
                      "--config.train.num_steps=2", "--config.train.batch_size=8", "--config.train.eval_every=2",
                      "--config.train.progress=False", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, release


def test_explain_command_end_to_end(ham_run):
    workdir, release = ham_run
    proc = run_launch("explain.py", f"--workdir={workdir}", "--num_images=6", "--ig_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollout" in proc.stdout and "energy" in proc.stdout
    result = json.loads((workdir / "explanations.json").read_text())
    assert set(result["attributions"]) == {"gradcam", "gxi", "ig", "rollout"}
    ids = [im["id"] for im in result["images"]]
    assert len(ids) == 6 == len(set(ids))
    masks = DatasetMasks(ml_collections.ConfigDict({"name": "ham10000", "manual_dir": str(release)}))
    for im in result["images"]:  # the recorded mask share is the mask file's, in the 32 px evaluation view
        want = eval_mask(read_mask(masks.path(im["id"])), 32).mean()
        assert im["mask_fraction"] == pytest.approx(want)
    for method, s in result["attributions"].items():
        assert s["energy"]["n"] == 6 and len(s["per_image"]["energy"]) == 6
        assert s["energy"]["ci_low"] <= s["energy"]["mean"] <= s["energy"]["ci_high"]
        grid = Image.open(workdir / "explanations" / f"{method}.png")
        assert grid.size[0] > 4 * 128 and grid.size[1] > 128
    thumbs = np.load(workdir / "explanations" / "thumbnails.npz")
    assert thumbs["images"].shape == (6, 32, 32, 3) and thumbs["gradcam"].shape == (6, 32, 32)
    # the same images for every explanation of a run of this dataset (a fixed-seed draw)
    from peft_jax.explain.run import finished_run, test_images

    subset, _ = test_images(finished_run(workdir), "test", 6)
    assert list(subset.ids) == ids


def test_explain_command_errors(ham_run, tmp_path):
    workdir, _ = ham_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((workdir / "config.json").read_text())
    proc = run_launch("explain.py", f"--workdir={unfinished}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("[peft_jax] ")]  # allocator
    assert lines == [f"error: {unfinished} is not a finished run: results.json is missing "
                     "(train it to the end with launch/train.py first)"]
    assert not (unfinished / "explanations.json").exists() and not (unfinished / "explanations").exists()

    from peft_jax.explain.run import explain_run

    no_masks = tmp_path / "no_masks"
    no_masks.mkdir()
    for name in ("results.json", "adapter"):
        (no_masks / name).symlink_to(workdir / name)
    cfg = json.loads((workdir / "config.json").read_text())
    cfg["dataset"]["name"] = "breastmnist"
    (no_masks / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dataset 'breastmnist' has no segmentation masks"):
        explain_run(no_masks)
    with pytest.raises(ValueError, match="no mask folder for ham10000"):
        explain_run(workdir, mask_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        explain_run(workdir, methods=["lime"])


# ---------------------------------------------------------------------------------------------
# The benchmark grid's option and the report's table and figure.

def fake_explained_run(root: pathlib.Path, method: str, seed: int, energy: list, pointing: list) -> dict:
    """A run folder with an explanations.json and thumbnails, as explain_run writes them."""
    run_dir = root / f"{method}{seed}"
    (run_dir / "explanations").mkdir(parents=True)
    n = len(energy)
    per_image = {"energy": energy, "pointing": pointing, "auroc": [0.5] * n}
    (run_dir / "explanations.json").write_text(json.dumps({
        "split": "test", "chance": {"mean": 0.25, "n": n}, "images": [{"id": f"ISIC_{k}"} for k in range(n)],
        "attributions": {"gradcam": {**scores.summarize(per_image), "per_image": per_image}}}))
    masks = np.zeros((n, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    np.savez(run_dir / "explanations" / "thumbnails.npz", ids=np.array([f"ISIC_{k}" for k in range(n)]),
             images=np.full((n, 8, 8, 3), 128, np.uint8), masks=masks,
             gradcam=np.random.default_rng(seed).random((n, 8, 8)).astype(np.float16))
    return {"model": "vit_ti16", "dataset": "ham10000", "method": method, "data_fraction": 0.1, "seed": seed,
            "run_dir": str(run_dir)}


def test_report_tables_and_figure_of_explanations(tmp_path):
    from peft_jax.hpo import report

    rows = [fake_explained_run(tmp_path, "lora", 0, [0.2, 0.4, 0.6], [1, 0, 1]),
            fake_explained_run(tmp_path, "lora", 1, [0.4, 0.6, None], [1, 1, 0]),
            fake_explained_run(tmp_path, "full", 0, [0.1, 0.1, 0.1], [0, 0, 0])]
    table = report.explanation_tables(rows)
    lines = [line for line in table.splitlines() if line]
    assert lines[0] == "### ham10000, vit_ti16: gradcam, test images"
    assert lines[1] == "| method | 10% energy | 10% pointing |"
    lora = next(line for line in lines if line.startswith("| lora"))
    # per image over seeds: energy (0.3, 0.5, 0.6) -> 0.467; pointing (1, 0.5, 0.5) -> 0.667
    assert lora.startswith("| lora | 0.467 [") and "| 0.667 [" in lora
    assert next(line for line in lines if line.startswith("| full")) == \
        "| full | 0.100 [0.100, 0.100] | 0.000 [0.000, 0.000] |"
    assert "(0.250) on energy" in table
    assert report.plot_explanations(rows, tmp_path / "explanations.png")
    assert Image.open(tmp_path / "explanations.png").size[0] > 200
    assert report.explanation_tables([{**rows[0], "run_dir": str(tmp_path / "none")}]) == ""


def test_report_pairs_each_methods_mask_energy_with_full_fine_tuning(tmp_path):
    from peft_jax.hpo import report

    rows = [fake_explained_run(tmp_path, "lora", 0, [0.2, 0.4, 0.6], [1, 0, 1]),
            fake_explained_run(tmp_path, "lora", 1, [0.4, 0.6, None], [1, 1, 0]),
            fake_explained_run(tmp_path, "ssf", 0, [0.1, 0.0, 0.2], [0, 0, 0]),
            fake_explained_run(tmp_path, "full", 0, [0.1, 0.1, 0.1], [0, 0, 0])]
    lines = report.explanation_gains(rows).splitlines()
    assert lines[0] == "### ham10000, vit_ti16: mask energy minus full's"
    assert lines[2] == "| method | 10% gradcam |"
    # lora per image over seeds (0.3, 0.5, 0.6) minus full's 0.1: (0.2, 0.4, 0.5), every resample above 0
    lora = next(line for line in lines if line.startswith("| lora"))
    assert lora.startswith("| lora | +0.367 [+0.2") and lora.endswith("]* |")
    # ssf minus full: (0, -0.1, +0.1), an interval across 0, no star
    assert next(line for line in lines if line.startswith("| ssf")).startswith("| ssf | +0.000 [-0.")
    assert not next(line for line in lines if line.startswith("| ssf")).endswith("* |")
    assert "| full |" not in "\n".join(lines)
    assert report.explanation_gains(rows[:3]) == ""  # no reference runs: no table
    other = json.loads((tmp_path / "full0" / "explanations.json").read_text())
    other["images"] = [{"id": f"ISIC_{k + 5}"} for k in range(3)]  # the reference explained other images
    (tmp_path / "full0" / "explanations.json").write_text(json.dumps(other))
    assert "| lora | – |" in report.explanation_gains(rows)


def test_benchmark_explains_final_runs_only_when_asked(tmp_path, capsys):
    from peft_jax.hpo import grid as benchmark

    cfg = ml_collections.ConfigDict({"benchmark": benchmark.benchmark_section("lora", "vit_ti16", "breastmnist", "1",
                                                                              "0")})
    assert cfg.benchmark.explain_images == 0
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    for name in ("results.json", "adapter/adapter_config.json"):
        (run_dir / name).write_text("{}")
    (run_dir / "config.json").write_text(json.dumps({"dataset": {"name": "breastmnist"}}))
    benchmark.explain_final_run(cfg, run_dir)  # off by default: nothing happens
    assert capsys.readouterr().out == ""
    cfg.benchmark.explain_images = 16
    benchmark.explain_final_run(cfg, run_dir)
    assert "no explanations: dataset 'breastmnist' has no segmentation masks" in capsys.readouterr().out
    assert not (run_dir / "explanations.json").exists()
