"""Reading image files and the 8-bit rule for images, shared by the dataset builders and loaders, text-to-image
training and FID."""
from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

from peft_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what image folders (t2i training, FID) are searched for


def require_8bit(image: Image.Image | np.ndarray, source: object) -> None:
    """Refuses 16-bit and float pixels (common for X-rays), in an image file or an array.

    PIL's conversion to "L" or "RGB" clips them at 255, which would silently turn most of the
    image white; casting a float array in [0, 1] to uint8 would turn it black.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            scaled = " (float images in [0, 1]: multiply by 255 and round)" if image.dtype.kind == "f" else ""
            raise UserError(f"{source}: pixels of dtype {image.dtype}, not uint8; store the images as uint8 "
                             f"(0-255){scaled}")
        return
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise UserError(f"{source}: pixels of mode {image.mode} (more than 8 bits); convert the images to 8 bits "
                         "first, with the intensity window you would display them with")


def read_rgb(source: str | pathlib.Path | io.BytesIO, size: int | None = None,
             resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """An 8-bit image file as uint8 (H, W, 3) (grey repeated over RGB), resized to (size, size) if given.

    An unreadable file is a ValueError naming it.
    """
    try:
        with Image.open(source) as image:
            require_8bit(image, source)
            rgb = image.convert("RGB")
            if size is not None:
                rgb = rgb.resize((size, size), resample)
            return np.asarray(rgb)
    except OSError as e:  # PIL's UnidentifiedImageError included
        raise UserError(f"{source}: not a readable image ({e})") from e


def signed_unit(rgb: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], the range of the Stable Diffusion VAE and the FID Inception."""
    return np.asarray(rgb, np.float32) / 127.5 - 1.0
