"""``prepare``: read a data source, convert every image to one shape, split, and write ``data/prepared/``."""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gmpipe.artifacts import atomic_dir, write_json
from gmpipe.config.data import DataConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.data import fashion_mnist, image_folder
from gmpipe.data.captions import caption_for_class
from gmpipe.data.prepared import (
    MANIFEST,
    REJECTED,
    Split,
    cap_per_class,
    captions_array,
    stratified_split,
    write_split,
)
from gmpipe.errors import GmpipeError
from gmpipe.paths import Paths

SECTIONS = ("data", "prepare")


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(os.fsencode(file.name))  # names need not be UTF-8
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _fit_fashion_mnist(images: np.ndarray, data: DataConfig) -> np.ndarray:
    """(N, 28, 28) -> (N, C, S, S): zero-pad when S > 28 (keeps pixels exact: the background is 0), else resize."""
    size = data.image_size
    if size >= 28 and (size - 28) % 2 == 0:
        pad = (size - 28) // 2
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    elif size != 28:
        from PIL import Image

        images = np.stack([
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS)) for im in images
        ])
    images = images[:, None]
    return np.repeat(images, data.channels, axis=1)


def _captions(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    return captions_array([caption_for_class(class_names[i]) for i in labels])


def _from_fashion_mnist(data: DataConfig, config: PrepareConfig):
    directory = Path(data.path)
    missing = [f for f in fashion_mnist.source_files(directory) if not f.is_file()]
    if missing:
        raise GmpipeError(
            f"{missing[0]}: Fashion-MNIST file not found (set data.path, or install the Debian package: "
            "apt-get install dataset-fashion-mnist)"
        )
    class_names = list(fashion_mnist.CLASS_NAMES)
    splits = {}
    for name in ("train", "test"):
        try:
            images, labels = fashion_mnist.load_split(directory, name)
        except (fashion_mnist.IdxFormatError, OSError) as exc:
            raise GmpipeError(f"{exc}; replace it with the original file (apt-get install --reinstall "
                              "dataset-fashion-mnist) or set data.path") from None
        splits[name] = Split(_fit_fashion_mnist(images, data), labels, _captions(labels, class_names))
    train_index, val_index = stratified_split(splits["train"].labels, config.val_fraction, config.seed)
    splits["val"] = splits["train"].take(val_index)
    splits["train"] = splits["train"].take(train_index)
    return splits, class_names, [], _hash_files(fashion_mnist.source_files(directory))


def _from_image_folder(data: DataConfig, config: PrepareConfig):
    root = Path(data.path)
    if not root.is_dir():
        raise GmpipeError(f"{root}: image folder not found (set data.path)")
    progress = partial(tqdm, desc="prepare: reading images", unit="img", mininterval=1.0)
    try:
        folder = image_folder.read_image_folder(root, data.channels, data.image_size, config.alpha_background,
                                                progress)
    except OSError as exc:
        raise GmpipeError(f"{exc.filename or root}: cannot be read ({exc.strerror or exc})") from None
    if not folder.class_names:
        example = f", e.g. {folder.rejected[0].file}: {folder.rejected[0].reason}" if folder.rejected else ""
        raise GmpipeError(f"{root}: no usable images in class sub-folders ({len(folder.rejected)} entries "
                          f"rejected{example})")
    class_names = folder.class_names
    texts = [caption or caption_for_class(class_names[label])
             for caption, label in zip(folder.captions, folder.labels, strict=True)]
    everything = Split(folder.images, folder.labels, captions_array(texts))
    rest, test_index = stratified_split(everything.labels, config.test_fraction, config.seed)
    rest_split = everything.take(rest)
    val_fraction = config.val_fraction / max(1.0 - config.test_fraction, 1e-9)
    train_index, val_index = stratified_split(rest_split.labels, val_fraction, config.seed + 1)
    splits = {
        "train": rest_split.take(train_index),
        "val": rest_split.take(val_index),
        "test": everything.take(test_index),
    }
    return splits, class_names, folder.rejected, _hash_files(folder.files)


SOURCES = {"fashion_mnist": _from_fashion_mnist, "image_folder": _from_image_folder}


def run(data: DataConfig, config: PrepareConfig, paths: Paths) -> dict:
    """Write the prepared splits, manifest and rejected list; return a summary for the flow's artifact."""
    splits, class_names, rejected, input_hash = SOURCES[data.source](data, config)
    for offset, name in enumerate(("train", "val", "test")):
        splits[name] = splits[name].take(cap_per_class(splits[name].labels, config.max_per_class, config.seed + offset))
    counts = {
        name: {
            "total": len(split),
            "per_class": {class_names[i]: int((split.labels == i).sum()) for i in range(len(class_names))},
        }
        for name, split in splits.items()
    }
    manifest = {
        "source": data.source,
        "path": str(data.path),
        "image_size": data.image_size,
        "channels": data.channels,
        "class_names": class_names,
        "counts": counts,
        "input_sha256": input_hash,
        "rejected": len(rejected),
    }
    with atomic_dir(paths.prepared) as out:
        for name, split in splits.items():
            write_split(out, name, split)
        write_json(out / MANIFEST, manifest)
        write_json(out / REJECTED, [{"file": r.file, "reason": r.reason} for r in rejected])
    return {
        "read": str(data.path),
        "wrote": str(paths.prepared),
        "counts": {name: c["total"] for name, c in counts.items()},
        "classes": len(class_names),
        "rejected": [{"file": r.file, "reason": r.reason} for r in rejected],
    }
