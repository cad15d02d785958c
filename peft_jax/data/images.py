"""Checks on decoded image files shared by the dataset builders, text-to-image training and FID."""
from __future__ import annotations

from PIL import Image


def require_8bit(image: Image.Image, source: object) -> None:
    """Refuses 16-bit and float pixels (common for X-rays): PIL's conversion to "L" or "RGB"
    clips them at 255, which would silently turn most of the image white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(f"{source}: pixels of mode {image.mode} (more than 8 bits); convert the images to 8 bits "
                         "first, with the intensity window you would display them with")
