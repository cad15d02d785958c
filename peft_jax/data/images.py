"""The 8-bit rule for images, shared by the dataset builders and loaders, text-to-image training and FID."""
from __future__ import annotations

import numpy as np
from PIL import Image


def require_8bit(image: Image.Image | np.ndarray, source: object) -> None:
    """Refuses 16-bit and float pixels (common for X-rays), in an image file or an array.

    PIL's conversion to "L" or "RGB" clips them at 255, which would silently turn most of the
    image white; casting a float array in [0, 1] to uint8 would turn it black.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            scaled = " (float images in [0, 1]: multiply by 255 and round)" if image.dtype.kind == "f" else ""
            raise ValueError(f"{source}: pixels of dtype {image.dtype}, not uint8; store the images as uint8 "
                             f"(0-255){scaled}")
        return
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(f"{source}: pixels of mode {image.mode} (more than 8 bits); convert the images to 8 bits "
                         "first, with the intensity window you would display them with")
