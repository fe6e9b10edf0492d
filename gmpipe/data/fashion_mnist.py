"""Fashion-MNIST from its four idx gz files (Xiao et al. 2017; the Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}
# The shapes the files must have: (N, 28, 28) images and (N,) labels in 0..9, N at most MAX_ITEMS.
IMAGE_SHAPE = (28, 28)
MAX_ITEMS = 1_000_000
_READ_CHUNK = 2**24


class IdxFormatError(ValueError):
    """A Fashion-MNIST file that is not what it should be; the message names the file."""


def _read_exactly(handle, count: int, path: Path, what: str) -> bytes:
    """``count`` bytes from a (gzip) stream, in chunks, so a lie in the header costs no more than the truth."""
    parts, remaining = [], count
    while remaining:
        block = handle.read(min(remaining, _READ_CHUNK))
        if not block:
            raise IdxFormatError(f"{path}: {what} ends after {count - remaining} of {count} bytes (truncated file)")
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts)


def read_idx(path: str | Path, expected_ndim: int | None = None, max_values: int = MAX_ITEMS * 28 * 28) -> np.ndarray:
    """Read a (gzipped) idx file: magic (2 zero bytes, dtype code, ndim), big-endian dims, then the data.

    Bounded by the header: the header is checked first (dtype, ``expected_ndim``, at most ``max_values`` values),
    exactly the bytes it promises are decompressed, and one more byte must not exist, so a gzip bomb is refused
    after reading what the header promised. Every problem is an :class:`IdxFormatError` naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            magic = _read_exactly(handle, 4, path, "the header")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise IdxFormatError(f"{path}: not an idx file of unsigned bytes (magic {magic.hex()})")
            ndim = magic[3]
            if expected_ndim is not None and ndim != expected_ndim:
                raise IdxFormatError(f"{path}: has {ndim} dimensions, expected {expected_ndim}")
            dims = struct.unpack(f">{ndim}I", _read_exactly(handle, 4 * ndim, path, "the header"))
            count = int(np.prod(dims, dtype=object))
            if count > max_values:
                raise IdxFormatError(f"{path}: header promises {count} values (shape {dims}), more than "
                                     f"{max_values}; not a Fashion-MNIST file")
            body = _read_exactly(handle, count, path, f"the data for shape {dims}")
            if handle.read(1):
                raise IdxFormatError(f"{path}: more data than its header promises (shape {dims})")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{path}: cannot be read ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    return np.frombuffer(body, dtype=_IDX_DTYPES[magic[2]]).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (used to make test fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def load_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the official ``train`` or ``test`` split, checked."""
    image_file, label_file = (Path(directory) / name for name in FILES[split])
    for file in (image_file, label_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing Fashion-MNIST file")
    images = read_idx(image_file, expected_ndim=3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise IdxFormatError(f"{image_file}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if len(images) == 0:
        raise IdxFormatError(f"{image_file}: holds no images")
    labels = read_idx(label_file, expected_ndim=1, max_values=MAX_ITEMS)
    if len(images) != len(labels):
        raise IdxFormatError(f"{label_file}: {len(labels)} labels for {len(images)} images in {image_file.name}")
    if labels.max() >= len(CLASS_NAMES):
        bad = int(np.flatnonzero(labels >= len(CLASS_NAMES))[0])
        raise IdxFormatError(f"{label_file}: label {labels[bad]} at index {bad} is out of range 0..9")
    return images, labels.astype(np.int64)


def source_files(directory: str | Path) -> list[Path]:
    return [Path(directory) / name for pair in FILES.values() for name in pair]
