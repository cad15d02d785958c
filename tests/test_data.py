"""MedMNIST loading and the grain pipelines, on the real BreastMNIST / PneumoniaMNIST files."""
import functools
import hashlib
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest

from peft_jax import data
from peft_jax.data import medmnist, pipeline


def _cfg(name: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(name=name, data_dir=None, manual_dir=None, fraction=1.0, download=False, skip_bad_files=False)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _indexed_split(n: int, size: int = 8) -> data.Split:
    """A split whose image i is the constant i, so batches can be traced back to examples."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 1)).copy()
    return data.Split(images=images, labels=np.arange(n) % 3)


def _example_ids(batch: dict) -> np.ndarray:
    """Inverts the normalisation of an un-augmented batch of `_indexed_split` images."""
    pixel = batch["image"][:, 0, 0, 0] * pipeline.IMAGENET_STD[0] + pipeline.IMAGENET_MEAN[0]
    return np.round(pixel * 255).astype(int)


@pytest.mark.parametrize("name, sizes, counts, class_names", [
    ("breastmnist", (546, 78, 156), ((147, 399), (21, 57), (42, 114)), ["malignant", "normal, benign"]),
    ("pneumoniamnist", (4708, 524, 624), ((1214, 3494), (135, 389), (234, 390)), ["normal", "pneumonia"]),
])
def test_medmnist_official_splits(shared_data, monkeypatch, name, sizes, counts, class_names):
    monkeypatch.setenv("PEFT_JAX_DATA", str(shared_data))
    ds = data.load_dataset(_cfg(name), seed=0)
    assert ds.name == name and ds.class_names == class_names and ds.num_classes == 2
    for split, size, count in zip((ds.train, ds.validation, ds.test), sizes, counts):
        assert split.images.shape == (size, 28, 28, 1) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int32 and split.labels.shape == (size,)
        assert tuple(np.bincount(split.labels)) == count
        assert split.subgroups == {}


def test_data_dir_comes_first(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PEFT_JAX_CACHE", str(tmp_path / "cache"))
    ds = data.load_dataset(_cfg("breastmnist", data_dir=str(shared_data / "medmnist")), seed=0)
    assert len(ds.train) == 546


def test_fraction_is_stratified_seeded_and_nested(shared_data, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_DATA", str(shared_data))
    full = data.load_dataset(_cfg("pneumoniamnist"), seed=0)
    small = data.load_dataset(_cfg("pneumoniamnist", fraction=0.1), seed=0)
    assert tuple(np.bincount(small.train.labels)) == (121, 349)  # round(0.1 * (1214, 3494))
    assert len(small.validation) == 524 and len(small.test) == 624  # only train is subsampled
    labels = full.train.labels
    a = data.stratified_subsample(labels, 0.1, seed=0)
    assert np.array_equal(a, data.stratified_subsample(labels, 0.1, seed=0))
    assert not np.array_equal(a, data.stratified_subsample(labels, 0.1, seed=1))
    assert np.all(np.diff(a) > 0)
    assert np.array_equal(full.train.images[a], small.train.images)
    assert set(a) <= set(data.stratified_subsample(labels, 0.2, seed=0))  # nested low-data regimes
    assert tuple(np.bincount(labels[data.stratified_subsample(labels, 1e-5, seed=0)])) == (1, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_bad_fraction_names_the_field(fraction):
    with pytest.raises(ValueError, match="dataset.fraction"):
        data.load_dataset(_cfg("breastmnist", fraction=fraction), seed=0)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset \(dataset.name\) 'mnist'.*Valid names: .*breastmnist.*pneumoniamnist"):
        data.load_dataset(_cfg("mnist"), seed=0)


def test_medmnist_has_every_2d_dataset_at_every_size(tmp_path, monkeypatch):
    assert set(medmnist.NAMES) == {"pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
                                   "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist",
                                   "organsmnist"}
    for name in medmnist.NAMES:
        assert sorted(medmnist.INFO[name]["md5"]) == [28, 64, 128, 224]
        assert all(len(md5) == 32 for md5 in medmnist.INFO[name]["md5"].values())
    assert medmnist.filename("bloodmnist", 28) == "bloodmnist.npz"
    assert medmnist.filename("bloodmnist", 224) == "bloodmnist_224.npz"
    # A MedMNIST+ file in the official layout (colour, 64 px) loads at dataset.size=64.
    monkeypatch.setenv("PEFT_JAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 8).reshape(n, 1).astype(np.uint8)
    np.savez(tmp_path / "bloodmnist_64.npz", **arrays)
    ds = data.load_dataset(_cfg("bloodmnist", size=64, data_dir=str(tmp_path)), seed=0)
    assert ds.num_classes == 8 and ds.train.images.shape == (16, 64, 64, 3)
    assert np.array_equal(ds.test.images, arrays["test_images"])
    with pytest.raises(ValueError, match="dataset.size must be one of"):
        data.load_dataset(_cfg("bloodmnist", size=32, data_dir=str(tmp_path)), seed=0)


def test_chestmnist_is_refused_as_multi_label():
    with pytest.raises(ValueError, match="multi-label"):
        data.load_dataset(_cfg("chestmnist"), seed=0)


def test_train_batches_resume_exactly_at_any_step(shared_data, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_DATA", str(shared_data))
    split = data.load_dataset(_cfg("breastmnist"), seed=0).train
    make = functools.partial(data.train_batches, split, batch_size=16, image_size=32, seed=7)
    it = make()
    from_start = [next(it) for _ in range(6)]
    resumed = make(start_step=4)
    for step in (4, 5):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], from_start[step]["image"])
        np.testing.assert_array_equal(batch["label"], from_start[step]["label"])
    other_seed = next(data.train_batches(split, batch_size=16, image_size=32, seed=8))
    assert not np.array_equal(other_seed["image"], from_start[0]["image"])


def test_train_batches_shapes_dtypes_and_augmentation(shared_data, monkeypatch):
    monkeypatch.setenv("PEFT_JAX_DATA", str(shared_data))
    split = data.load_dataset(_cfg("breastmnist"), seed=0).train
    batch = next(data.train_batches(split, batch_size=8, image_size=48, seed=0))
    assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    # Grey images are replicated to 3 channels before the per-channel normalisation.
    pixels = batch["image"] * pipeline.IMAGENET_STD + pipeline.IMAGENET_MEAN
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    plain = next(data.train_batches(split, batch_size=8, image_size=48, seed=0, augment=False))
    np.testing.assert_array_equal(plain["label"], batch["label"])  # same examples, different views
    assert not np.allclose(plain["image"], batch["image"])


def test_train_batches_reshuffle_every_epoch_and_shard_the_global_batch():
    split = _indexed_split(12)
    it = data.train_batches(split, batch_size=12, image_size=8, seed=3, augment=False)
    epochs = [_example_ids(next(it)) for _ in range(3)]
    for ids in epochs:
        assert sorted(ids) == list(range(12))  # each epoch sees every example once
    assert not np.array_equal(epochs[0], epochs[1])
    global_batch = next(data.train_batches(split, batch_size=6, image_size=8, seed=3, augment=False, start_step=1))
    shards = [next(data.train_batches(split, batch_size=6, image_size=8, seed=3, augment=False, start_step=1,
                                      shard_index=i, shard_count=3)) for i in range(3)]
    for i, shard in enumerate(shards):
        assert shard["image"].shape[0] == 2
        np.testing.assert_array_equal(shard["image"], global_batch["image"][i::3])
    with pytest.raises(ValueError, match="multiple of shard_count"):
        data.train_batches(split, batch_size=7, image_size=8, seed=0, shard_count=2)


def test_random_resized_crop_stays_in_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = pipeline.random_crop_box(28, 20, rng, (0.5, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 20 and 0 <= top < bottom <= 28
        assert (right - left) * (bottom - top) >= 0.4 * 28 * 20


def test_eval_batches_pad_the_last_batch_and_mask_it():
    split = _indexed_split(10)
    batches = list(data.eval_batches(split, batch_size=4, image_size=8))
    assert [b["image"].shape for b in batches] == [(4, 8, 8, 3)] * 3
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == np.bool_ and mask.tolist() == [True] * 10 + [False] * 2
    ids = np.concatenate([_example_ids(b) for b in batches])[:10]
    np.testing.assert_array_equal(ids, np.arange(10))  # in order, unaugmented
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), list(range(10)) + [-1, -1])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], split.labels)


def test_eval_resizes_and_normalises_exactly():
    white = data.Split(images=np.full((1, 28, 28, 1), 255, np.uint8), labels=[0])
    (batch,) = data.eval_batches(white, batch_size=1, image_size=64)
    expected = (1.0 - pipeline.IMAGENET_MEAN) / pipeline.IMAGENET_STD
    np.testing.assert_allclose(batch["image"][0], np.broadcast_to(expected, (64, 64, 3)), rtol=1e-6)


def _isolate_search_path(monkeypatch, tmp_path) -> pathlib.Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PEFT_JAX_CACHE", str(cache))
    monkeypatch.delenv("PEFT_JAX_DATA", raising=False)
    return cache / "medmnist"


def test_missing_file_error_names_dataset_places_and_url(tmp_path, monkeypatch):
    cache = _isolate_search_path(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        data.load_dataset(_cfg("breastmnist", data_dir=str(tmp_path / "mine")), seed=0)
    message = str(error.value)
    assert "breastmnist" in message and str(tmp_path / "mine") in message and str(cache) in message
    assert "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1" in message


@pytest.fixture
def medmnist_server(http_server):
    """(served folder, MedMNIST URL template) of the local HTTP server."""
    root, base = http_server
    return root, base + "/{filename}?download=1"


def test_download_verifies_md5_and_is_reused(shared_data, tmp_path, monkeypatch, medmnist_server):
    served, url = medmnist_server
    cache = _isolate_search_path(monkeypatch, tmp_path)
    shutil.copy(shared_data / "medmnist" / "breastmnist.npz", served / "breastmnist.npz")
    monkeypatch.setattr(medmnist, "URL", url)
    ds = data.load_dataset(_cfg("breastmnist", download=True), seed=0)
    assert len(ds.train) == 546
    assert [p.name for p in cache.iterdir()] == ["breastmnist.npz"]
    assert hashlib.md5((cache / "breastmnist.npz").read_bytes()).hexdigest() == medmnist.INFO["breastmnist"]["md5"][28]
    (served / "breastmnist.npz").unlink()  # a second load must not need the server
    assert len(data.load_dataset(_cfg("breastmnist", download=True), seed=0).test) == 156


def test_download_with_bad_md5_leaves_nothing_in_cache(tmp_path, monkeypatch, medmnist_server):
    served, url = medmnist_server
    cache = _isolate_search_path(monkeypatch, tmp_path)
    (served / "breastmnist.npz").write_bytes(b"not the real file")
    monkeypatch.setattr(medmnist, "URL", url)
    with pytest.raises(OSError) as error:
        data.load_dataset(_cfg("breastmnist", download=True), seed=0)
    message = str(error.value)
    assert "breastmnist.npz" in message and medmnist.INFO["breastmnist"]["md5"][28] in message
    assert hashlib.md5(b"not the real file").hexdigest() in message and str(cache) in message
    assert not cache.exists() or not any(cache.iterdir())


def test_download_from_file_url(shared_data, tmp_path, monkeypatch):
    cache = _isolate_search_path(monkeypatch, tmp_path)
    monkeypatch.setattr(medmnist, "URL", (shared_data / "medmnist").as_uri() + "/{filename}")
    assert len(data.load_dataset(_cfg("breastmnist", download=True), seed=0).validation) == 78
    assert (cache / "breastmnist.npz").is_file()


def test_grain_worker_processes_give_the_same_batches():
    split = _indexed_split(20)
    make = functools.partial(data.train_batches, split, batch_size=4, image_size=12, seed=5, start_step=2)
    threads, workers = make(), make(num_workers=2)
    for _ in range(4):
        a, b = next(threads), next(workers)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    workers.close()


def test_unreachable_download_says_where_to_put_the_file(tmp_path):
    from peft_jax import cache

    dest = tmp_path / "cache" / "breastmnist.npz"
    with pytest.raises(FileNotFoundError, match=r"could not download breastmnist.npz .*put it here"):
        cache.download("http://127.0.0.1:1/breastmnist.npz", dest, digest="0" * 32, algorithm="md5",
                       manual_hint="put it here")
    assert not dest.exists() and not any(dest.parent.iterdir())
