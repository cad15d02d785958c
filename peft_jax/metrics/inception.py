"""Inception-v3 pool3 features for FID: jitted batches of arrays, and image folders read as pytorch-fid does.

pytorch-fid reads an image as RGB in [0, 1] and resizes it inside the network, bilinearly
to 299 x 299 without antialiasing. Images of a folder differ in size, so here each image is
resized on the host with the same interpolation weights (``resize_bilinear``), and every
batch then has one shape: one compile for a whole folder.
"""
from __future__ import annotations

import functools
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peft_jax.data.images import IMAGE_SUFFIXES, read_rgb, signed_unit
from peft_jax.errors import UserError
from peft_jax.models.inception import FEATURE_DIM, INPUT_SIZE, InceptionV3


@functools.partial(jax.jit, static_argnums=0)
def _pool3(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images)


def inception_features(model: InceptionV3, batch_size: int = 32) -> Callable[[np.ndarray], np.ndarray]:
    """``features(images)`` for ``fid()``: NHWC uint8 or [-1, 1] float images -> (N, 2048) float32.

    Images go through the jitted network `batch_size` at a time, as float32 (uint8 is scaled on
    the host); the last batch is padded to full size, so a stream of equally sized images compiles once.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    graphdef, state = nnx.split(model)

    def features(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception features need NHWC RGB images, got shape {images.shape}")
        images = images / np.float32(127.5) - 1 if images.dtype == np.uint8 else images.astype(np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            n = len(batch)
            if n < batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
            out.append(np.asarray(_pool3(graphdef, state, jnp.asarray(batch)))[:n])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)

    return features


def _interpolation(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize along one axis (align_corners=False).

    torch computes the source coordinate ``scale * (i + 0.5) - 0.5`` with a float32 scale and one
    fused multiply-add, rounded once to float32; the same here (float64, then rounded) matches its
    output to 1e-7, where two float32 roundings were 4e-6 off.
    """
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo.astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """(H, W, C) -> (size, size, C) float32, as torch's F.interpolate(mode="bilinear", align_corners=False)."""
    image = np.asarray(image, np.float32)
    lo, hi, w = _interpolation(image.shape[0], size)
    image = image[lo] * (1 - w)[:, None, None] + image[hi] * w[:, None, None]
    lo, hi, w = _interpolation(image.shape[1], size)
    return image[:, lo] * (1 - w)[None, :, None] + image[:, hi] * w[None, :, None]


def image_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The png/jpg images under `folder`, recursively, sorted; an error when there are none."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it or its subfolders")
    return files


def load_image(path: pathlib.Path, size: int = INPUT_SIZE) -> np.ndarray:
    """One 8-bit image file as (size, size, 3) float32 in [-1, 1], resized as pytorch-fid does."""
    return signed_unit(resize_bilinear(read_rgb(path), size))


def folder_features(files: Sequence[pathlib.Path], features: Callable[[np.ndarray], np.ndarray], *,
                    batch_size: int = 32, progress: bool = True, desc: str = "images") -> np.ndarray:
    """(N, D) features of image files, `batch_size` at a time (never all in memory).

    Threads decode and resize the next batch while the network runs on the current one:
    decoding large X-rays, not the network, bounds the speed on a GPU.
    """
    from tqdm.auto import tqdm

    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    out = []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(files), unit="img", desc=desc, disable=not progress) as bar:
        pending = [pool.submit(load_image, p) for p in chunks[0]] if chunks else []
        for i, chunk in enumerate(chunks):
            images = np.stack([f.result() for f in pending])
            if i + 1 < len(chunks):
                pending = [pool.submit(load_image, p) for p in chunks[i + 1]]
            out.append(features(images))
            bar.update(len(chunk))
    return np.concatenate(out)


def open_source(source: str) -> tuple[np.ndarray, np.ndarray] | list[pathlib.Path]:
    """A side of the FID, checked before any image is processed: its (mu, sigma) if a .npz, else its image files."""
    from peft_jax.metrics.fid import load_statistics

    path = pathlib.Path(source).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such statistics file")
        return load_statistics(path)
    files = image_files(path)
    if len(files) < 2:
        raise UserError(f"{path}: FID needs at least 2 images, found {len(files)}")
    return files


def compare(args: Sequence[str], *, weights: str, batch_size: int = 32, save: str | None = None,
            progress: bool = True) -> dict:
    """launch/fid.py: the FID of ``args`` = (REAL, FAKE) image folders or statistics files, and/or REAL's
    statistics saved to ``save``; returns the JSON record the command prints last."""
    from peft_jax.metrics.fid import feature_statistics, frechet_distance, save_statistics
    from peft_jax.models import from_pretrained

    if save and not save.endswith(".npz"):
        raise UserError(f"--save_stats must name a .npz file, got {save}")
    sources = [open_source(a) for a in args]
    if save and isinstance(sources[0], tuple):
        raise UserError(f"--save_stats needs REAL to be an image folder, not statistics ({args[0]})")
    used_weights = weights if any(isinstance(s, list) for s in sources) else None  # statistics need no network
    features = inception_features(from_pretrained("inception_v3_fid", weights), batch_size) if used_weights else None
    stats, counts = [], []
    for arg, source in zip(args, sources):
        if isinstance(source, tuple):
            stats.append(source)
            counts.append(None)
            continue
        feats = folder_features(source, features, batch_size=batch_size, progress=progress,
                                desc=pathlib.Path(arg).name or arg)
        stats.append(feature_statistics(feats))
        counts.append(len(source))
    if save:
        save_statistics(save, *stats[0], counts[0])
        print(f"saved the statistics of {counts[0]} images of {args[0]} to {save}", file=sys.stderr)
        if len(args) == 1:
            return {"saved_stats": save, "real": args[0], "num_real": counts[0], "weights": used_weights}
    value = frechet_distance(*stats[0], *stats[1])
    return {"fid": value, "real": args[0], "fake": args[1], "num_real": counts[0], "num_fake": counts[1],
            "weights": used_weights}
