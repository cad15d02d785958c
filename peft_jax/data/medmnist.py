"""MedMNIST v2 / MedMNIST+ 2D datasets, loaded from their official `.npz` files.

Source: https://medmnist.com, files on Zenodo record 10519652 (CC BY 4.0; DermaMNIST
CC BY-NC 4.0). Cite Yang et al., "MedMNIST v2", Scientific Data 10, 41 (2023).
Each file holds `{train,val,test}_images` (N, S, S) or (N, S, S, 3) uint8 and
`{train,val,test}_labels` (N, 1); the official splits are used as they are.

A file is looked for, in order, in `dataset.data_dir`, `$PEFT_JAX_DATA/medmnist/` and the
user cache (`$PEFT_JAX_CACHE/medmnist` or `~/.cache/peft_jax/medmnist`); when absent and
`dataset.download` is True it is downloaded into the cache and its md5 checked against the
official value (the MD5 table of MedMNIST's `medmnist/info.py`).
"""
from __future__ import annotations

import os
import pathlib
import zipfile
import zlib

import ml_collections
import numpy as np

from peft_jax import cache
from peft_jax.data.images import require_8bit
from peft_jax.data.splits import DatasetSplits, Split
from peft_jax.errors import UserError

URL = "https://zenodo.org/records/10519652/files/{filename}?download=1"
SIZES = (28, 64, 128, 224)

_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen"]

# Class names (MedMNIST label dictionaries) and md5 per image size (MedMNIST info.py, v3).
INFO: dict[str, dict] = {
    "pathmnist": {
        "classes": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                    "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
        "md5": {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
                128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    },
    "chestmnist": {
        "classes": ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                    "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"],
        "md5": {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
                128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
        "multi_label": True,
    },
    "dermamnist": {
        "classes": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                    "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                    "vascular lesions"],
        "md5": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    },
    "octmnist": {
        "classes": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
        "md5": {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
                128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    },
    "pneumoniamnist": {
        "classes": ["normal", "pneumonia"],
        "md5": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    },
    "retinamnist": {  # Ordinal 5-level diabetic retinopathy grade, trained as 5 classes.
        "classes": ["0", "1", "2", "3", "4"],
        "md5": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    },
    "breastmnist": {
        "classes": ["malignant", "normal, benign"],
        "md5": {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
                128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    },
    "bloodmnist": {
        "classes": ["basophil", "eosinophil", "erythroblast",
                    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                    "monocyte", "neutrophil", "platelet"],
        "md5": {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
                128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    },
    "tissuemnist": {
        "classes": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                    "Proximal Tubule Segments", "Thick Ascending Limb"],
        "md5": {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
                128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    },
    "organamnist": {
        "classes": _ORGANS,
        "md5": {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
                128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    },
    "organcmnist": {
        "classes": _ORGANS,
        "md5": {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
                128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    },
    "organsmnist": {
        "classes": _ORGANS,
        "md5": {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
                128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
    },
}

NAMES = tuple(INFO)


def filename(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def search_dirs(data_dir: str | None) -> list[pathlib.Path]:
    """Where a MedMNIST file is looked for, in order."""
    dirs = []
    if data_dir:
        dirs.append(pathlib.Path(data_dir))
    if os.environ.get("PEFT_JAX_DATA"):
        dirs.append(pathlib.Path(os.environ["PEFT_JAX_DATA"]) / "medmnist")
    dirs.append(cache.cache_dir("medmnist"))
    return dirs


def find_or_download(name: str, size: int, *, data_dir: str | None, download: bool) -> pathlib.Path:
    """The path of the `.npz` for (name, size), downloading it into the cache if allowed."""
    fname = filename(name, size)
    dirs = search_dirs(data_dir)
    for folder in dirs:
        if (folder / fname).is_file():
            return folder / fname
    url = URL.format(filename=fname)
    places = ", ".join(str(d) for d in dirs)
    if not download:
        raise FileNotFoundError(
            f"MedMNIST dataset {name!r} (size {size}): {fname} was not found in {places}. "
            f"Download it from {url} into one of these folders (or set dataset.data_dir), "
            f"or set dataset.download=True.")
    destination = cache.cache_dir("medmnist") / fname
    hint = f"Download {url} by hand and put it in one of: {places}."
    return cache.download(url, destination, digest=INFO[name]["md5"][size], algorithm="md5", manual_hint=hint)


def load(cfg: ml_collections.ConfigDict) -> DatasetSplits:
    """The official train / val / test splits of one MedMNIST dataset (`cfg.name`, `cfg.size`)."""
    name = cfg.name
    size = int(cfg.get("size", 28) or 28)
    if size not in SIZES:
        raise UserError(f"dataset.size must be one of {SIZES} for MedMNIST, got {size!r}.")
    if INFO[name].get("multi_label"):
        raise UserError(
            f"{name} is multi-label (14 findings per image, any number of them present); peft_jax trains "
            f"single-label classifiers. Choose another MedMNIST dataset, e.g. pneumoniamnist.")
    path = find_or_download(name, size, data_dir=cfg.get("data_dir"), download=bool(cfg.get("download", True)))
    refetch = f"Delete it and download {filename(name, size)} again ({URL.format(filename=filename(name, size))})."
    with _open_npz(path, refetch) as npz:
        missing = [f"{s}_{kind}" for s in ("train", "val", "test") for kind in ("images", "labels")
                   if f"{s}_{kind}" not in npz.files]
        if missing:
            raise UserError(f"{path} is not a MedMNIST file: it lacks the arrays {missing}. {refetch}")
        splits = {s: _split(_array(npz, f"{s}_images", path, refetch), _array(npz, f"{s}_labels", path, refetch),
                            f"{path} {s}") for s in ("train", "val", "test")}
    return DatasetSplits(name=name, class_names=list(INFO[name]["classes"]), train=splits["train"],
                         validation=splits["val"], test=splits["test"])


def _open_npz(path: pathlib.Path, refetch: str):
    """The file as an npz archive; anything else (a renamed or truncated download) is named with the fix."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path} is not a readable .npz file ({type(e).__name__}). {refetch}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} holds a single array, not a MedMNIST .npz archive. {refetch}")
    return npz


def _array(npz, key: str, path: pathlib.Path, refetch: str) -> np.ndarray:
    try:
        return npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # object arrays, truncated members
        raise UserError(f"{path}: its array {key!r} cannot be read ({type(e).__name__}). {refetch}") from None


def _split(images: np.ndarray, labels: np.ndarray, where: str) -> Split:
    require_8bit(images, f"{where}_images")
    if labels.dtype.kind not in "iu":
        raise UserError(f"{where}_labels: labels of dtype {labels.dtype}, not integers; store the class indices "
                         "as integers")
    if images.ndim not in (3, 4) or len(images) != labels.size:
        raise UserError(f"{where}: {images.shape} images for {labels.size} labels; a MedMNIST split holds (N, S, S) or "
                        "(N, S, S, 3) images and N labels")
    if images.ndim == 3:  # Grey-scale files store (N, S, S).
        images = images[..., None]
    return Split(images=np.ascontiguousarray(images), labels=labels.reshape(-1).astype(np.int32))
