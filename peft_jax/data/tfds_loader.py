"""Prepare (once) and read the TFDS-built datasets: array_record files read with tfds data sources.

The prepared dataset lives in `dataset.data_dir` (default: the user cache,
`$PEFT_JAX_CACHE/tfds` or `~/.cache/peft_jax/tfds`); when it is absent it is built from the
release files in `dataset.manual_dir` (default: `$PEFT_JAX_DATA/<family>`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import sys

import ml_collections
import numpy as np
from PIL import Image

from peft_jax import cache
from peft_jax.data import builders
from peft_jax.data.splits import DatasetSplits, Split
from peft_jax.errors import UserError
from peft_jax.files import read_json

SPLITS = ("train", "validation", "test")
SOURCE_FILE = "peft_jax_source.json"  # the fingerprint of the release files a preparation was built from


def default_manual_dir(name: str) -> pathlib.Path | None:
    root = os.environ.get("PEFT_JAX_DATA")
    return pathlib.Path(root) / builders.family(name) if root else None


def make_builder(name: str, *, data_dir: str | os.PathLike | None = None, config: str | None = None,
                 skip_bad_files: bool = False):
    """The TFDS builder of `name`, writing / reading array_record files under `data_dir`."""
    from google.protobuf import json_format  # pylint: disable=g-import-not-at-top

    data_dir = os.fspath(data_dir) if data_dir else os.fspath(cache.cache_dir("tfds"))
    try:
        return builders.get(name)(data_dir=data_dir, config=config, file_format="array_record",
                                  skip_bad_files=skip_bad_files)
    except json_format.ParseError as e:  # TFDS reads the prepared copy's dataset_info.json here
        root = pathlib.Path(data_dir, name) if pathlib.Path(data_dir, name).is_dir() else pathlib.Path(data_dir)
        damaged = sorted(str(f.parent) for f in root.rglob("dataset_info.json") if not _parses(f))
        raise UserError(f"the prepared dataset {', '.join(damaged) or data_dir} is damaged (its dataset_info.json "
                         f"does not parse: {e}); delete that folder and run again to prepare it from its manual "
                         "directory") from None


def _parses(path: pathlib.Path) -> bool:
    try:
        read_json(path, "")
    except ValueError:
        return False
    return True


def prepare(name: str, *, manual_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
            config: str | None = None, skip_bad_files: bool = False):
    """Builds the dataset from its release files unless already prepared; returns the builder."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = make_builder(name, data_dir=data_dir, config=config, skip_bad_files=skip_bad_files)
    manual = pathlib.Path(manual_dir) if manual_dir else default_manual_dir(name)
    source = manual if manual is not None and manual.is_dir() else None
    if _is_prepared(builder):
        stale = None if source is None else stale_reason(builder, source)  # no source left: the copy is all there is
        if stale is None:
            return builder
        print(f"[data] {name}: {stale}; preparing {builder.data_dir} again", file=sys.stderr, flush=True)
        shutil.rmtree(builder.data_dir)
        builder = make_builder(name, data_dir=data_dir, config=config, skip_bad_files=skip_bad_files)
    if source is None:
        raise FileNotFoundError(
            f"Dataset {name!r} is not prepared in {builder.data_dir} and its manual directory "
            f"{str(manual) if manual else '(unset)'} does not exist. Set dataset.manual_dir (or $PEFT_JAX_DATA). "
            f"{' '.join(builder.manual_instructions().split())}")  # one line: the launchers print `error: ...`
    print(f"[data] preparing {name} from {source} into {builder.data_dir}", file=sys.stderr, flush=True)
    fingerprint = source_fingerprint(builder, source)  # before building: a change during the build is seen next time
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
    (pathlib.Path(builder.data_dir) / SOURCE_FILE).write_text(json.dumps(fingerprint, indent=1))
    return builder


def _is_prepared(builder) -> bool:
    return (pathlib.Path(builder.data_dir) / "dataset_info.json").is_file()


def source_fingerprint(builder, manual: pathlib.Path) -> dict:
    """What a preparation was built from: the builder, its version and options, and every release file's
    relative name, size and modification time (cheap: no file is read)."""
    digest = hashlib.sha256()
    count = 0
    prepared = pathlib.Path(builder.data_dir).parents[1 if builder.builder_config else 0].resolve()
    for folder, _, files in sorted(os.walk(manual, followlinks=True)):
        if pathlib.Path(folder).resolve().is_relative_to(prepared):  # a data_dir inside the manual dir
            continue
        for file in sorted(files):
            path = pathlib.Path(folder) / file
            info = path.stat()
            digest.update(f"{path.relative_to(manual)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
            count += 1
    return {"builder": builder.name, "config": builder.builder_config.name if builder.builder_config else None,
            "version": str(builder.version), "max_side": builder.max_side, "files": count,
            "files_sha256": digest.hexdigest()}


def stale_reason(builder, manual: pathlib.Path) -> str | None:
    """Why the prepared copy no longer matches its source (None when it does)."""
    path = pathlib.Path(builder.data_dir) / SOURCE_FILE
    if not path.is_file():
        return "the prepared copy records no fingerprint of its source"
    try:
        recorded = read_json(path, "it is written again")
    except ValueError:
        return f"its source fingerprint {path.name} is unreadable"
    current = source_fingerprint(builder, manual)
    if recorded == current:
        return None
    if recorded.get("files") != current["files"]:
        return f"{manual} holds {current['files']} files now, {recorded.get('files')} when it was prepared"
    changed = [k for k in current if recorded.get(k) != current[k]]
    return f"the source changed since it was prepared ({', '.join(changed)} differ)"


def load(cfg: ml_collections.ConfigDict) -> DatasetSplits:
    """The train / validation / test splits of a TFDS-built dataset, images decoded lazily."""
    builder = prepare(cfg.name, manual_dir=cfg.get("manual_dir"), data_dir=cfg.get("data_dir"),
                      config=cfg.get("config"), skip_bad_files=bool(cfg.get("skip_bad_files", False)))
    splits = {s: read_split(builder, s) for s in SPLITS}
    return DatasetSplits(name=cfg.name, class_names=list(builder.info.features["label"].names), **splits)


def read_split(builder, split: str) -> Split:
    """Labels and subgroups in memory; images stay encoded on disk until a batch needs them."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    records = source.__getitems__(range(len(source))) if len(source) else []
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    subgroups = {}
    for key in builder.SUBGROUPS:
        subgroups[key] = np.array([_text(r[key]) for r in records])
    if "age" in subgroups:  # Per-subgroup metrics need categories, not raw ages.
        subgroups["age_group"] = age_groups(subgroups.pop("age").astype(np.float32))
    channels = builder.info.features["image"].shape[-1]
    ids = np.array([_text(r["id"]) for r in records], dtype=str)
    return Split(images=EncodedImages(source, channels), labels=labels, subgroups=subgroups, ids=ids)


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def age_groups(ages: np.ndarray) -> np.ndarray:
    """Twenty-year age bins ("0-19" ... "80+"), "unknown" for missing (negative or NaN) ages."""
    bins = np.array(["0-19", "20-39", "40-59", "60-79", "80+"])
    valid = np.isfinite(ages) & (ages >= 0)
    groups = np.where(valid, bins[np.clip(np.nan_to_num(ages, nan=0) // 20, 0, 4).astype(int)], "unknown")
    return groups.astype(str)


class EncodedImages:
    """A lazy sequence of uint8 (H, W, C) images decoded from a TFDS data source on access."""

    def __init__(self, source, channels: int):
        self._source = source
        self._mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(io.BytesIO(self._source[int(index)]["image"])) as image:
            array = np.asarray(image.convert(self._mode))
        return array[..., None] if array.ndim == 2 else array
