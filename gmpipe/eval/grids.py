"""Sample grids: uint8 image batches tiled into one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def label_rows(image: Image.Image, labels: list[str], row_height: int, padding: int) -> Image.Image:
    """``image`` (a grid of ``len(labels)`` rows, each ``row_height`` pixels plus ``padding``) with a white margin on
    the left holding each row's label, vertically centred on its row (PIL's bundled font: nothing is fetched)."""
    font = ImageFont.load_default(size=max(10, min(16, row_height // 2)))
    measure = ImageDraw.Draw(image)
    margin = 8 + max(int(measure.textlength(label, font=font)) for label in labels)
    canvas = Image.new(image.mode, (image.width + margin, image.height), 255 if image.mode == "L" else (255,) * 3)
    canvas.paste(image, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(labels):
        middle = padding + row * (row_height + padding) + row_height / 2
        draw.text((margin - 4, middle), label, fill=0 if image.mode == "L" else (0, 0, 0), font=font, anchor="rm")
    return canvas


def save_grid(images: np.ndarray, path: str | Path, columns: int, scale: int = 2,
              row_labels: list[str] | None = None) -> None:
    """Write a tiled uint8 batch as PNG, upscaled by ``scale`` (nearest) so small images stay visible; with
    ``row_labels`` (one per row of ``columns`` images), each row named in a margin on the left."""
    padding = 2
    canvas = tile(images, columns, padding)
    image = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    if row_labels:
        rows = -(-len(images) // columns)
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows")
        image = label_rows(image, row_labels, images.shape[2] * scale, padding * scale)
    with atomic_file(path, "wb") as handle:
        image.save(handle, format="PNG")
