"""Segmentation masks of a dataset's examples, read beside the prepared dataset by example id.

The builder says where its release keeps them (``MASKS`` of ``peft_jax.data.builders``); the
masks are not part of the prepared dataset. Each mask covers the same frame as its image, so it
takes the image's evaluation view through ``peft_jax.data.pipeline.eval_mask``, the one function
that follows the evaluation transform: an attribution map and its mask are in the same pixels.
"""
from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
from PIL import Image

from peft_jax.data import builders
from peft_jax.data.pipeline import eval_mask
from peft_jax.data.tfds_loader import default_manual_dir
from peft_jax.errors import UserError

ASPECT_TOLERANCE = 0.02  # a mask whose aspect ratio differs more from its image's belongs to another image


def read_mask(path: pathlib.Path) -> np.ndarray:
    """A binary (H, W) mask. Grey masks with soft edges and palette PNGs (some with an inverted
    palette, as in HAM10000) both come out right through a conversion to grey, then > 127."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


class DatasetMasks:
    """Where a dataset's masks are; ``eval_view(id, image_hw, size)`` gives one in the eval frame."""

    def __init__(self, dataset: ml_collections.ConfigDict, mask_dir: str | None = None):
        name = dataset.name
        patterns = builders.get(name).MASKS if name in builders.BUILDERS else ()
        if not patterns:
            with_masks = [n for n in builders.BUILDERS if builders.get(n).MASKS]
            raise UserError(f"dataset {name!r} has no segmentation masks to score explanations against; "
                             f"datasets with masks: {', '.join(with_masks)}")
        if mask_dir:
            self.pattern = str(pathlib.Path(mask_dir) / pathlib.Path(patterns[0]).name)
            folders = [pathlib.Path(mask_dir)]
        else:
            manual = dataset.get("manual_dir") or default_manual_dir(name)
            if not manual:
                raise UserError(f"the masks of {name} are found in its manual directory: set dataset.manual_dir "
                                 "in the run's config, $PEFT_JAX_DATA, or --mask_dir")
            candidates = [str(pathlib.Path(manual) / p) for p in patterns]
            folders = [pathlib.Path(c).parent for c in candidates]
            self.pattern = next((c for c, f in zip(candidates, folders) if f.is_dir()), "")
        if not self.pattern or not pathlib.Path(self.pattern).parent.is_dir():
            raise UserError(f"no mask folder for {name}: none of {', '.join(map(str, folders))} exists (this copy "
                             "of the dataset has no masks; point dataset.manual_dir or --mask_dir at one that does)")

    def path(self, example_id: str) -> pathlib.Path:
        return pathlib.Path(self.pattern.format(id=example_id))

    def eval_view(self, example_id: str, image_hw: tuple[int, int], image_size: int) -> np.ndarray:
        """The example's mask, checked to fit its image's frame, in the evaluation view (size x size)."""
        path = self.path(example_id)
        if not path.is_file():
            raise UserError(f"no mask for example {example_id}: {path} does not exist")
        mask = read_mask(path)
        (h, w), (mh, mw) = image_hw, mask.shape
        if abs(mw / mh - w / h) > ASPECT_TOLERANCE * (w / h):
            raise UserError(f"mask {path} is {mw}x{mh} but its image is {w}x{h}: not the same frame")
        return eval_mask(mask, image_size)
