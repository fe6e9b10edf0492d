"""Fashion-MNIST from its four idx gz files (Xiao et al. 2017; the Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import struct
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


class IdxFormatError(ValueError):
    pass


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic (2 zero bytes, dtype code, ndim), big-endian dims, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise IdxFormatError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {body.size}")
    return body.reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (used to make test fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def load_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the official ``train`` or ``test`` split."""
    image_file, label_file = (Path(directory) / name for name in FILES[split])
    for file in (image_file, label_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing Fashion-MNIST file")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IdxFormatError(f"{image_file}: {images.shape} images do not match {labels.shape} labels")
    return images, labels.astype(np.int64)


def source_files(directory: str | Path) -> list[Path]:
    return [Path(directory) / name for pair in FILES.values() for name in pair]
