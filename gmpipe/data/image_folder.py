"""An image folder: one sub-folder per class, any image format, size and mode, optional ``captions.jsonl``.

Files that cannot be used (zero bytes, not an image, truncated, too large to decode safely) are skipped and
reported with a reason; they never stop the run.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse images that would decode to more than this many pixels (decompression bombs, absurd scans).
MAX_PIXELS = 64_000_000
CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class Rejected:
    file: str
    reason: str


@dataclass(frozen=True)
class FolderEntry:
    file: Path
    relative: str
    label: int


def list_classes(root: Path) -> list[str]:
    """Class names: the sorted names of the sub-folders (hidden ones excluded)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_entries(root: Path, classes: list[str]) -> list[FolderEntry]:
    entries = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.is_file() and not file.name.startswith("."):
                entries.append(FolderEntry(file, file.relative_to(root).as_posix(), label))
    return entries


def read_captions(root: Path) -> tuple[dict[str, str], list[Rejected]]:
    """``captions.jsonl`` lines ``{"file": "class/name.png", "caption": "..."}``; bad lines are reported."""
    path = root / CAPTIONS_FILE
    captions: dict[str, str] = {}
    problems: list[Rejected] = []
    if not path.is_file():
        return captions, problems
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file, caption = record["file"], record["caption"]
            if not isinstance(file, str) or not isinstance(caption, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            problems.append(Rejected(f"{CAPTIONS_FILE}:{number}", 'not a {"file": str, "caption": str} line'))
            continue
        captions[file] = caption
    return captions, problems


def _to_8bit(image: Image.Image) -> Image.Image:
    """High bit-depth and float greyscale modes scaled (not clipped) to 8 bits."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0
    elif image.mode == "I":
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        scaled = array.astype(np.float64) * (255.0 / top)
    else:  # "F"
        low, high = float(array.min(initial=0.0)), float(array.max(initial=1.0))
        scaled = (array - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def convert_image(image: Image.Image, channels: int, size: int, background: int = 255) -> np.ndarray:
    """Any PIL image to a (channels, size, size) uint8 array.

    Transparency is composited on a grey level ``background``; the shorter side is resized to ``size``
    (Lanczos) and the centre is cropped.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P" or image.mode == "LA" or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (background,) * 3 + (255,))
        image = Image.alpha_composite(canvas, image)
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def load_image(file: Path, channels: int, size: int, background: int = 255) -> np.ndarray | Rejected:
    """Decode one file fully; a problem comes back as a :class:`Rejected` with the reason."""
    if file.stat().st_size == 0:
        return Rejected(str(file), "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if image.width * image.height > MAX_PIXELS:
                    return Rejected(str(file), f"too large ({image.width}x{image.height} > {MAX_PIXELS} pixels)")
                image.load()
                return convert_image(image, channels, size, background)
    except UnidentifiedImageError:
        return Rejected(str(file), "not an image PIL can read")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejected(str(file), f"too large to decode safely ({exc})")
    except (OSError, SyntaxError, ValueError) as exc:
        return Rejected(str(file), f"truncated or corrupt ({exc})")
