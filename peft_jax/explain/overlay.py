"""Pictures of explanations: the image, its attribution as a heat map and the mask's outline.

Heat maps show the positive attribution scaled to each image's maximum (inferno colour map);
the lesion outline is drawn in green on both tiles.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from peft_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

OUTLINE = np.array([0, 255, 0], np.uint8)
MIN_TILE = 128  # small inputs are enlarged (nearest) to at least this many pixels


def display_image(normalized: np.ndarray) -> np.ndarray:
    """uint8 RGB from a pipeline-normalised (H, W, 3) image."""
    return np.clip((normalized * IMAGENET_STD + IMAGENET_MEAN) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def heat(attribution: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of the positive attribution, 0 to the map's maximum."""
    from matplotlib import colormaps

    positive = np.maximum(np.asarray(attribution, np.float32), 0.0)
    top = positive.max()
    scaled = positive / top if top > 0 else positive
    return (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: inside, with a 4-neighbour outside (the frame counts as outside)."""
    padded = np.pad(np.asarray(mask, bool), 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.asarray(mask, bool) & ~interior


def _enlarged(a: np.ndarray, size: int) -> np.ndarray:
    scale = max(1, math.ceil(MIN_TILE / size))
    return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)


def image_tile(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask outline, enlarged to MIN_TILE if small."""
    tile = _enlarged(image, image.shape[0])
    tile[outline(_enlarged(mask, image.shape[0]))] = OUTLINE
    return tile


def heat_tile(image: np.ndarray, attribution: np.ndarray, mask: np.ndarray, *, alpha: float = 0.6) -> np.ndarray:
    """The heat map over the image, with the mask outline, enlarged to MIN_TILE if small."""
    size = image.shape[0]
    base = _enlarged(image, size)
    tile = ((1 - alpha) * base + alpha * heat(_enlarged(attribution, size))).astype(np.uint8)
    tile[outline(_enlarged(mask, size))] = OUTLINE
    return tile


def tile_pair(image: np.ndarray, attribution: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.concatenate([image_tile(image, mask), heat_tile(image, attribution, mask)], axis=1)


def write_grid(path: pathlib.Path, images: np.ndarray, attributions: np.ndarray, masks: np.ndarray,
               captions: list[str], columns: int = 4) -> None:
    """A PNG grid of ``tile_pair`` s (``columns`` pairs a row), each captioned underneath."""
    pairs = [tile_pair(i, a, m) for i, a, m in zip(images, attributions, masks)]
    h, w, _ = pairs[0].shape
    text_h = 14
    columns = min(columns, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    canvas = Image.new("RGB", (columns * (w + 4), rows * (h + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (pair, caption) in enumerate(zip(pairs, captions)):
        x, y = (k % columns) * (w + 4), (k // columns) * (h + text_h + 4)
        canvas.paste(Image.fromarray(pair), (x, y))
        draw.text((x + 2, y + h + 1), caption, fill="black")
    canvas.save(path)


def comparison_figure(path: pathlib.Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                      title: str) -> None:
    """One row per model (label, images, attributions, masks) over the same images: heat maps over the
    image with the mask outline; the first row also shows the images themselves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(1.6 * n, 1.6 * (len(rows) + 1)), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(image_tile(rows[0][1][j], rows[0][3][j]))
    axes[0, 0].set_ylabel("image", fontsize=8)
    for i, (label, images, maps, masks) in enumerate(rows, start=1):
        for j in range(n):
            axes[i, j].imshow(heat_tile(images[j], maps[j], masks[j]))
        axes[i, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
