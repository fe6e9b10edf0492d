"""Sample grids: uint8 image batches tiled into one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gmpipe.artifacts import atomic_file


def tile(images: np.ndarray, columns: int, padding: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (rows*(H+p)+p, columns*(W+p)+p, C) canvas, row-major."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // columns))
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), fill, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[top : top + h, left : left + w] = images[i].transpose(1, 2, 0)
    return canvas


def save_grid(images: np.ndarray, path: str | Path, columns: int, scale: int = 2) -> None:
    """Write a tiled uint8 batch as PNG, upscaled by ``scale`` (nearest) so small images stay visible."""
    canvas = tile(images, columns)
    image = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    with atomic_file(path, "wb") as handle:
        image.save(handle, format="PNG")
