"""Bad input refused at the boundary (issue 17, outside the training loop): labels, pixels, ViT sizes,
config files, adapter files, sweeps' seeds and workers, stale prepared data and unreadable files."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from flax import nnx

from peft_jax import data
from peft_jax.config import base_config, check_config_keys
from peft_jax.models import vit_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_medmnist(folder: pathlib.Path, images=None, labels=None, val: int = 4) -> pathlib.Path:
    """A small breastmnist.npz: 8 / val / 4 grey 28 px images of classes 0 and 1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", val), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    if images is not None:
        arrays["train_images"] = images
    if labels is not None:
        arrays["test_labels"] = labels
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "breastmnist.npz", **arrays)
    return folder / "breastmnist.npz"


def medmnist_cfg(folder: pathlib.Path) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="breastmnist", size=28, data_dir=str(folder), download=False,
                                          fraction=1.0))


# ------------------------------------------------------------------ labels, pixels, empty splits, files


def test_out_of_range_labels_are_refused_naming_dataset_split_values_and_counts(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_JAX_DATA", raising=False)
    write_medmnist(tmp_path, labels=np.array([[0], [5], [5], [-1]], np.int64))
    with pytest.raises(ValueError) as error:
        data.load_dataset(medmnist_cfg(tmp_path), seed=0)
    message = str(error.value)
    assert "'breastmnist' test split" in message and "[0, 2)" in message
    assert "-1 (1x)" in message and "5 (2x)" in message and "fix the labels" in message
    split = data.Split(images=np.zeros((3, 4, 4, 1), np.uint8), labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"'toy' validation split: labels must be in \[0, 2\).* 2 \(1x\)"):
        data.DatasetSplits("toy", ["a", "b"], train=split.take(np.array([0, 1])), validation=split, test=split)


def test_float_medmnist_images_are_refused_not_cast_to_black(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_JAX_DATA", raising=False)
    write_medmnist(tmp_path, images=np.full((8, 28, 28), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"breastmnist.npz train_images: pixels of dtype float32, not uint8.*"
                                         r"multiply by 255"):
        data.load_dataset(medmnist_cfg(tmp_path), seed=0)


def test_empty_validation_split_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_JAX_DATA", raising=False)
    write_medmnist(tmp_path, val=0)
    with pytest.raises(ValueError, match="dataset 'breastmnist': the validation split is empty"):
        data.load_dataset(medmnist_cfg(tmp_path), seed=0)


@pytest.mark.parametrize("content", [b"not an npz at all\n", b"PK\x03\x04 truncated zip", "npy"])
def test_unreadable_data_file_is_named_with_the_fix(tmp_path, monkeypatch, content):
    monkeypatch.delenv("PEFT_JAX_DATA", raising=False)
    path = tmp_path / "breastmnist.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        data.load_dataset(medmnist_cfg(tmp_path), seed=0)
    message = str(error.value)
    assert str(path) in message and "Delete it and download breastmnist.npz again" in message
    assert "unsafely" not in message and "\n" not in message


# ------------------------------------------------------------------ ViT sizes


@pytest.mark.parametrize("image_size,patch_size,nearest", [(8, 16, "16"), (28, 16, "16 and 32"), (30, 4, "28 and 32")])
def test_vit_image_size_must_be_a_positive_multiple_of_the_patch(image_size, patch_size, nearest):
    with pytest.raises(ValueError) as error:
        vit_config("vit_ti16", num_classes=2, image_size=image_size, patch_size=patch_size)
    message = str(error.value)
    assert f"model.image_size={image_size}" in message and f"model.patch_size={patch_size}" in message
    assert message.endswith(f"nearest valid sizes are {nearest}")
    assert vit_config("vit_ti16", num_classes=2, image_size=28, patch_size=4).grid_size == 7


# ------------------------------------------------------------------ config files


def load_config_file(path: pathlib.Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.py")),
                         ids=str)
def test_every_config_file_passes_the_key_check(path):
    cfg = load_config_file(ROOT / "configs" / path)
    if path.name.startswith("sd15"):  # launch/train_t2i.py's schema
        check_config_keys(cfg, str(path), schema=load_config_file(ROOT / "configs" / "sd15.py"))
    else:
        check_config_keys(cfg, str(path), free=("quickstart",))


def test_a_typo_in_a_config_file_names_the_key_and_the_closest_ones(tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text("from peft_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                    "    c.train.lrr = 0.1\n    return c\n")
    with pytest.raises(ValueError, match=r"typo.py: unknown config key 'train.lrr'. Did you mean: train.lr"):
        check_config_keys(load_config_file(typo), str(typo))
    cfg = load_config_file(ROOT / "configs" / "sweep_quick.py")
    cfg.sweep.num_trails = 3
    with pytest.raises(ValueError, match=r"unknown config key 'sweep.num_trails'. Did you mean: sweep.num_trials"):
        check_config_keys(cfg, "sweep_quick.py")
    cfg = base_config()
    cfg.trian = ml_collections.ConfigDict({"lr": 1.0})
    with pytest.raises(ValueError, match="unknown config key 'trian'. Did you mean: train"):
        check_config_keys(cfg, "x.py")


# ------------------------------------------------------------------ adapter files


@pytest.fixture
def saved_lora(tmp_path):
    from peft_jax.adapters import apply_peft, trainable_filter
    from peft_jax.adapters.io import save_adapter
    from peft_jax.models import create_model

    cfg = base_config()
    cfg.peft.method = "lora"

    def model():
        m = create_model("vit_ti16", num_classes=2, image_size=16, patch_size=8, depth=1, rngs=nnx.Rngs(0))
        return apply_peft(m, cfg.peft, rngs=nnx.Rngs(1))

    save_adapter(tmp_path / "a", model(), trainable_filter(cfg.peft), config=cfg, base_hash="h")
    return tmp_path / "a", model, trainable_filter(cfg.peft)


def test_adapter_of_another_alpha_is_refused_without_peft_config(saved_lora):
    from peft_jax.adapters.io import load_adapter

    folder, model, trainable = saved_lora
    load_adapter(model(), folder, trainable, base_hash="h")  # the surgery's own config, recorded by apply_peft
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["peft"]["alpha"] = 16.0
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"another PEFT config: peft.alpha: adapter 16.0 vs 8.0"):
        load_adapter(model(), folder, trainable, base_hash=None)
    del meta["base_hash"]
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter_config.json lacks 'base_hash'"):
        load_adapter(model(), folder, trainable, base_hash="h")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        load_adapter(model(), folder, trainable, base_hash="h")


@pytest.mark.parametrize("dtype", [np.int32, np.float16])
def test_adapter_arrays_of_another_dtype_are_refused_naming_the_variable(saved_lora, dtype):
    from safetensors.numpy import load_file, save_file

    from peft_jax.adapters.io import flat_arrays, load_adapter

    folder, model, trainable = saved_lora
    arrays = load_file(str(folder / "adapter.safetensors"))
    name = sorted(k for k in arrays if "lora_a" in k)[0]
    arrays[name] = arrays[name].astype(dtype)
    save_file(arrays, str(folder / "adapter.safetensors"))
    target = model()
    before = flat_arrays(nnx.state(target, nnx.Param))
    with pytest.raises(ValueError, match=rf"{name.removeprefix('params/')}: file {np.dtype(dtype)} vs model float32"):
        load_adapter(target, folder, trainable, base_hash="h")
    after = flat_arrays(nnx.state(target, nnx.Param))
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was half-loaded


def test_fake_safetensors_is_named(saved_lora):
    from peft_jax.adapters.io import load_adapter

    folder, model, trainable = saved_lora
    (folder / "adapter.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"adapter.safetensors is not a readable safetensors file"):
        load_adapter(model(), folder, trainable, base_hash="h")


# ------------------------------------------------------------------ sweeps


def test_resumed_and_parallel_sweep_processes_never_repeat_earlier_params(tmp_path):
    pytest.importorskip("optuna")
    from peft_jax import hpo
    from peft_jax.hpo import space as space_lib
    from peft_jax.hpo import sweep as sweep_lib

    cfg = base_config()
    cfg.sweep = hpo.sweep_section(num_trials=9, space={"common": "train.lr=log(1e-4, 1e-1)"})
    cfg.lock()
    space = space_lib.space_for(cfg.sweep, "lora")
    for _ in range(3):  # three processes (a resumed sweep, another host) opening the same study in turn
        sweep_lib.open_study(cfg, tmp_path).optimize(lambda t: float(space_lib.suggest(t, space)["train.lr"]), n_trials=3)
    values = [t.params["train.lr"] for t in sweep_lib.open_study(cfg, tmp_path).get_trials()]
    assert len(values) == 9 and len(set(values)) == 9, values


PARENT = """
import multiprocessing, sys, time
from peft_jax.hpo import sweep
proc = sweep.start_worker(multiprocessing.get_context("spawn"), time.sleep, (120,))
print(proc.pid, flush=True)
time.sleep(120)
"""


def test_workers_of_a_killed_sweep_end_with_it():
    pytest.importorskip("optuna")
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    worker = int(parent.stdout.readline())
    time.sleep(1.0)  # the worker is up and watching
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(worker):
        time.sleep(0.2)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its sweep"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))  # a zombie is dead


# ------------------------------------------------------------------ stale prepared data


def busi_cfg(shared_data: pathlib.Path, tmp_path: pathlib.Path, per_class: int = 30) -> ml_collections.ConfigDict:
    """A BUSI manual folder of links to the shared images, and the dataset config that prepares it."""
    manual = tmp_path / "busi"
    for cls in ("benign", "malignant", "normal"):
        (manual / cls).mkdir(parents=True)
        for f in sorted((shared_data / "busi" / cls).iterdir())[:per_class]:
            os.symlink(f, manual / cls / f.name)
    return ml_collections.ConfigDict(dict(name="busi", manual_dir=str(manual), data_dir=str(tmp_path / "tfds"),
                                          fraction=1.0, config=None, skip_bad_files=False))


def test_a_changed_manual_folder_is_prepared_again(shared_data, tmp_path, capfd):
    cfg = busi_cfg(shared_data, tmp_path)
    manual = pathlib.Path(cfg.manual_dir)
    total = lambda ds: len(ds.train) + len(ds.validation) + len(ds.test)  # noqa: E731
    assert total(data.load_dataset(cfg, seed=0)) == 90 and "preparing busi" in capfd.readouterr().err
    assert total(data.load_dataset(cfg, seed=0)) == 90 and "preparing" not in capfd.readouterr().err  # reused
    for f in sorted((manual / "benign").iterdir())[:10] + sorted((manual / "normal").iterdir())[:10]:
        f.unlink()
    assert total(data.load_dataset(cfg, seed=0)) == 70
    err = capfd.readouterr().err
    assert f"[data] busi: {manual} holds 70 files now, 90 when it was prepared; preparing" in err


def test_a_damaged_preparation_is_named_with_the_fix(shared_data, tmp_path):
    cfg = busi_cfg(shared_data, tmp_path, per_class=5)
    data.load_dataset(cfg, seed=0)
    info = next((tmp_path / "tfds").rglob("dataset_info.json"))
    info.write_text("{broken")
    with pytest.raises(ValueError, match=rf"the prepared dataset {info.parent} is damaged .*delete that folder"):
        data.load_dataset(cfg, seed=0)
