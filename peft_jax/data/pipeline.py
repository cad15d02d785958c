"""grain input pipelines: seeded, resumable training batches and padded evaluation batches.

Per-image work is cheap numpy / PIL (crop and resize in one PIL call); grain threads run
it in parallel. Every random choice comes from grain's per-index generator, so the batch
of training step k depends only on (seed, k) and a resumed run continues exactly.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Iterator

import grain
import numpy as np
from PIL import Image

from peft_jax.data.splits import Split

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Random resized crop defaults: ImageNet's (0.08, 1) scale throws away most of a 28 px image.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C), C in {1, 3} -> float32 (H, W, 3), ImageNet mean / std normalised."""
    x = image.astype(np.float32) * (1.0 / 255.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def _pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"Expected a uint8 image (H, W, C) with C in {{1, 3}}, got shape {image.shape}.")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, C) image to (size, size, C)."""
    if image.shape[0] == size and image.shape[1] == size:
        return np.asarray(image, dtype=np.uint8)
    return _from_pil(_pil(image).resize((size, size), Image.BILINEAR))


def random_crop_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering `scale` of the area at aspect `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # Fallback: the largest central crop whose aspect is within `ratio`.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment_image(image: np.ndarray, rng: np.random.Generator, *, image_size: int,
                  crop_scale: tuple[float, float] = CROP_SCALE, crop_ratio: tuple[float, float] = CROP_RATIO,
                  hflip: bool = True) -> np.ndarray:
    """Training view: random resized crop to `image_size` (bilinear), optional horizontal flip."""
    box = random_crop_box(image.shape[0], image.shape[1], rng, crop_scale, crop_ratio)
    out = _from_pil(_pil(image).resize((image_size, image_size), Image.BILINEAR, box=box))
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def _train_example(example: dict, rng: np.random.Generator, *, image_size: int, crop_scale, crop_ratio,
                   hflip: bool) -> dict:
    image = augment_image(example["image"], rng, image_size=image_size, crop_scale=crop_scale,
                          crop_ratio=crop_ratio, hflip=hflip)
    return {"image": normalize(image), "label": example["label"]}


def _eval_example(example: dict, *, image_size: int) -> dict:
    return {"image": normalize(resize(example["image"], image_size)), "label": example["label"]}


def eval_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A binary (H, W) mask in the frame of its image's evaluation view: the same geometry as
    ``_eval_example`` (keep the two together), thresholded at half after the bilinear resize."""
    grey = np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)[..., None]
    return resize(grey, image_size)[..., 0] > 127


class _Source:
    """grain random-access source over a Split (in-memory arrays or a lazy image sequence)."""

    def __init__(self, split: Split):
        self._split = split

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._split.images[index], "label": np.int32(self._split.labels[index])}


def _read_options(num_threads: int | None, buffer: int) -> grain.ReadOptions:
    threads = min(8, os.cpu_count() or 1) if num_threads is None else num_threads
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, 1))


def train_batches(split: Split, *, batch_size: int, image_size: int, seed: int, start_step: int = 0,
                  augment: bool = True, num_workers: int = 0, shard_index: int = 0, shard_count: int = 1,
                  crop_scale: tuple[float, float] = CROP_SCALE, crop_ratio: tuple[float, float] = CROP_RATIO,
                  hflip: bool = True, num_threads: int | None = None) -> Iterator[dict]:
    """Infinite training batches {"image": float32 (B, S, S, 3), "label": int32 (B,)}.

    B = batch_size // shard_count: this process's shard of the global batch. The examples are
    reshuffled every epoch; the global batch of step k holds stream positions
    [k * batch_size, (k + 1) * batch_size), interleaved over shards, and each image's
    augmentation is seeded by (seed, position), so the batch for step k is the same whether
    the iterator started at 0 or at `start_step=k`. `num_workers > 0` adds grain worker
    processes (opt-in: threads are enough for small images and need no absl flag parsing).
    """
    if len(split) == 0:
        raise ValueError("train_batches needs a non-empty split.")
    if batch_size <= 0 or batch_size % shard_count:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of shard_count ({shard_count}).")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    local_batch = batch_size // shard_count
    ds = grain.MapDataset.source(_Source(split)).shuffle(seed=seed).repeat()
    if augment:
        ds = ds.random_map(functools.partial(_train_example, image_size=image_size, crop_scale=tuple(crop_scale),
                                             crop_ratio=tuple(crop_ratio), hflip=hflip), seed=seed)
    else:
        ds = ds.map(functools.partial(_eval_example, image_size=image_size))
    # Batching the random-access dataset makes element k the batch of step k: resuming is a slice, and
    # grain workers (which take every num_workers-th element) still deliver the batches in order.
    ds = ds[shard_index::shard_count].batch(local_batch, drop_remainder=True)[start_step:]
    it = ds.to_iter_dataset(_read_options(num_threads, 4))
    if num_workers > 0:
        _allow_grain_multiprocessing()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def _eval_or_pad(index: int, *, split: Split, image_size: int) -> dict:
    if index < len(split):
        example = _eval_example({"image": split.images[index], "label": split.labels[index]}, image_size=image_size)
        return {**example, "mask": np.bool_(True), "index": np.int32(index)}
    return {"image": np.zeros((image_size, image_size, 3), np.float32), "label": np.int32(0),
            "mask": np.bool_(False), "index": np.int32(-1)}


def eval_batches(split: Split, *, batch_size: int, image_size: int,
                 num_threads: int | None = None) -> Iterator[dict]:
    """One pass over `split` in order, every batch of shape `batch_size`.

    The last batch is padded with zero images; "mask" (bool) marks the real examples and
    "index" (int32, -1 for padding) their position in the split, so that evaluation can
    look up per-example metadata such as `split.subgroups`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    padded = math.ceil(len(split) / batch_size) * batch_size
    ds = grain.MapDataset.range(padded).map(functools.partial(_eval_or_pad, split=split, image_size=image_size))
    return iter(ds.batch(batch_size).to_iter_dataset(_read_options(num_threads, 4)))


def _allow_grain_multiprocessing() -> None:
    """grain worker processes read absl flags; mark them parsed when no absl.app.run did."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
