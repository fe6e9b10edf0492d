"""An image folder: one sub-folder per class, any image format, size and mode, optional ``captions.jsonl``.

Every file passes through one decoder, :func:`load_image`. What cannot be used is skipped and reported with a
reason (``Rejected``), never fatal:

- files: empty, not an image, truncated or corrupt, too large to decode safely (more than ``MAX_PIXELS`` pixels or
  ``MAX_DECODED_BYTES`` decoded), or too elongated (sides more unequal than ``MAX_ASPECT``: the centre crop would
  keep almost nothing, and a 1 x 1,000,000 strip would be upscaled to 32 x 32,000,000);
- entries: hidden files and folders (a name starting with ``.``, e.g. ``.ipynb_checkpoints/``, ``.DS_Store``),
  ``__MACOSX/``, links to folders (not followed), anything that is not a regular file, files beside the class
  folders; a hidden folder is listed once, not file by file;
- class folders with no usable image are not classes.

File and folder names that are not valid UTF-8 are kept and shown with ``\\xNN`` escapes. EXIF orientation is
applied, so phone photos stored sideways come out upright.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from gmpipe.data.captions import CAPTIONS_FILE, Caption, read_captions, unused_captions
from gmpipe.data.prepared import Rejected

MAX_PIXELS = 64_000_000  # decoded pixels (after JPEG draft decoding at a reduced scale)
MAX_DECODED_BYTES = 192 * 2**20  # decoded pixels x bytes per pixel, as Pillow stores them
MAX_ASPECT = 16  # longer side / shorter side
MACOS_METADATA = "__MACOSX"

# Bytes per pixel as Pillow stores each mode (multi-band modes use 4 bytes per pixel).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}
# EXIF orientation -> the transpose that makes the image upright (EXIF 2.3, tag 0x0112).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class FolderEntry:
    file: Path
    relative: str  # "class/name.png", for reports and captions
    class_name: str


@dataclass
class FolderListing:
    classes: list[str]  # every candidate class folder, sorted
    entries: list[FolderEntry]
    skipped: list[Rejected] = field(default_factory=list)


@dataclass
class FolderImages:
    """What an image folder yields: images (N, C, S, S) uint8, labels (N,), one caption or None per image."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str | None]
    class_names: list[str]
    files: list[Path]
    rejected: list[Rejected]


def shown_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogate escapes) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _skip_reason(entry: os.DirEntry) -> str | None:
    """Why a folder entry is not read (hidden, macOS metadata, link to a folder, not a regular file), or None."""
    if entry.name.startswith("."):
        return "hidden: skipped"
    if entry.name == MACOS_METADATA:
        return "macOS archive metadata: skipped"
    if entry.is_symlink() and entry.is_dir():
        return "link to a folder: not followed"
    if entry.is_dir(follow_symlinks=False):
        return None
    if not entry.is_file():
        return "broken link: skipped" if not os.path.exists(entry.path) else "not a regular file: skipped"
    return None


def _walk(folder: Path, relative: str, class_name: str, listing: FolderListing) -> None:
    """Every usable file under a class folder, depth first in name order; the rest goes to ``listing.skipped``."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        listing.skipped.append(Rejected(relative + "/", f"cannot be listed ({exc.strerror}): skipped"))
        return
    for entry in entries:
        name = f"{relative}/{shown_name(entry.name)}"
        reason = _skip_reason(entry)
        if reason:
            listing.skipped.append(Rejected(name + ("/" if entry.is_dir() else ""), reason))
        elif entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), name, class_name, listing)
        else:
            listing.entries.append(FolderEntry(Path(entry.path), name, class_name))


def scan_folder(root: Path) -> FolderListing:
    """The candidate classes (the non-hidden sub-folders of ``root``, links followed) and their files."""
    listing = FolderListing([], [])
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        name = shown_name(entry.name)
        if entry.name == CAPTIONS_FILE and entry.is_file():
            continue
        if entry.name.startswith(".") or entry.name == MACOS_METADATA:
            listing.skipped.append(Rejected(name + ("/" if entry.is_dir() else ""), _skip_reason(entry)))
        elif entry.is_dir():
            listing.classes.append(name)
            _walk(Path(entry.path), name, name, listing)
        else:
            listing.skipped.append(Rejected(name, "not in a class folder: skipped"))
    return listing


def _to_8bit(image: Image.Image) -> Image.Image:
    """High bit-depth and float greyscale modes scaled (not clipped) to 8 bits."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float32) / 257.0
    elif image.mode == "I":
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        scaled = array.astype(np.float32) * (255.0 / top)
    else:  # "F"
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(array.min(initial=0.0)), float(array.max(initial=1.0))
        scaled = (array - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _centre_square(image: Image.Image) -> Image.Image:
    """The centred square of side min(width, height): the only part that survives the final centre crop."""
    width, height = image.size
    side = min(width, height)
    if width == height:
        return image
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def convert_image(image: Image.Image, channels: int, size: int, background: int = 255) -> np.ndarray:
    """Any PIL image to a (channels, size, size) uint8 array.

    The centred square is cut first (so no step ever works on more than the decoded image), transparency is
    composited on a grey level ``background``, and the square is resized to ``size`` (Lanczos).
    """
    image = _centre_square(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode in ("P", "PA", "LA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (background,) * 3 + (255,))
        image = Image.alpha_composite(canvas, image)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[None].copy() if channels == 1 else array.transpose(2, 0, 1).copy()


def _shape_problem(image: Image.Image) -> str | None:
    width, height = image.size
    if min(width, height) < 1:
        return f"no pixels ({width}x{height})"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"too elongated ({width}x{height}; sides may differ at most {MAX_ASPECT}x)"
    return None


def _size_problem(image: Image.Image) -> str | None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        return f"too large ({width}x{height} > {MAX_PIXELS} pixels)"
    decoded = width * height * _STORED_BYTES.get(image.mode, 4)
    if decoded > MAX_DECODED_BYTES:
        return f"too large ({width}x{height} {image.mode} decodes to {decoded} > {MAX_DECODED_BYTES} bytes)"
    return None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the image as stored, it does not reject it
        return 1


def _decode(file: Path, channels: int, size: int, background: int) -> np.ndarray | Rejected:
    """The steps of :func:`load_image`: header checks, reduced-scale JPEG decoding, decoding, the centred square
    turned upright, conversion."""
    with Image.open(file) as image:
        problem = _shape_problem(image)
        if problem is None:
            image.draft(image.mode, (size, size))  # JPEG only: decode at 1/2..1/8 scale when that still covers
            problem = _size_problem(image)
        if problem:
            return Rejected(str(file), problem)
        image.load()
        upright = _UPRIGHT.get(_orientation(image))
        square = _centre_square(image)
        if upright is not None:
            square = square.transpose(upright)
        return convert_image(square, channels, size, background)


def load_image(file: Path, channels: int, size: int, background: int = 255) -> np.ndarray | Rejected:
    """Decode one file into a (channels, size, size) uint8 array, or a :class:`Rejected` with the reason.

    The size is checked from the header before any pixel is decoded; JPEGs are decoded at the smallest DCT scale
    that still covers ``size``. Any failure of the decoder (Pillow's format plugins raise many exception types on
    hostile input) is a rejection, never a crash.
    """
    try:
        if os.stat(file).st_size == 0:
            return Rejected(str(file), "empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns about odd files (corrupt EXIF, bombs) without naming them; the decisions below are reported
            # against the file instead, and the size limits below are tighter than Pillow's own.
            warnings.simplefilter("ignore")
            return _decode(file, channels, size, background)
    except UnidentifiedImageError:
        return Rejected(str(file), "not an image PIL can read")
    except Image.DecompressionBombError as exc:
        return Rejected(str(file), f"too large to decode safely ({exc})")
    except MemoryError:
        return Rejected(str(file), "not enough memory to decode it")
    except Exception as exc:  # noqa: BLE001 - see the docstring
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        return Rejected(str(file), f"truncated or corrupt ({detail})")


def read_image_folder(root: Path, channels: int, size: int, background: int = 255, progress=None) -> FolderImages:
    """Every usable image of the folder, its class and caption; everything else in ``rejected``.

    ``progress`` (e.g. ``tqdm``) wraps the iteration over files.
    """
    listing = scan_folder(root)
    captions, caption_problems = read_captions(root / CAPTIONS_FILE)
    rejected = listing.skipped + caption_problems
    by_class: dict[str, list[tuple[np.ndarray, FolderEntry]]] = {name: [] for name in listing.classes}
    entries = progress(listing.entries) if progress else listing.entries
    for entry in entries:
        result = load_image(entry.file, channels, size, background)
        if isinstance(result, Rejected):
            rejected.append(Rejected(entry.relative, result.reason))
        else:
            by_class[entry.class_name].append((result, entry))
    class_names = [name for name in listing.classes if by_class[name]]
    rejected += [Rejected(name + "/", "no usable images: not a class") for name in listing.classes
                 if not by_class[name]]
    used = [(array, entry, label) for label, name in enumerate(class_names) for array, entry in by_class[name]]
    used_names = {entry.relative for _, entry, _ in used}
    rejected += unused_captions(captions, used_names, {r.file for r in rejected})
    return FolderImages(
        images=np.stack([array for array, _, _ in used]) if used else np.zeros((0, channels, size, size), np.uint8),
        labels=np.array([label for _, _, label in used], dtype=np.int64),
        captions=[_caption(captions, entry.relative) for _, entry, _ in used],
        class_names=class_names,
        files=[entry.file for _, entry, _ in used],
        rejected=rejected,
    )


def _caption(captions: dict[str, Caption], relative: str) -> str | None:
    caption = captions.get(relative)
    return caption.text if caption else None
