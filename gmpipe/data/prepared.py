"""The prepared dataset on disk: what every later stage loads.

Layout of ``data/prepared/``::

    train.npz, val.npz, test.npz   images (N, C, H, W) uint8, labels (N,) int64, and the captions stored once
                                   each: caption_bytes (B,) uint8 (the distinct captions, UTF-8, concatenated),
                                   caption_offsets (U + 1,) int64, caption_index (N,) int64
    manifest.json                  counts per split and class, class names, image size, channels, input hash
    rejected.json                  [{"file": ..., "reason": ...}] for every input that was skipped

Captions are stored once per distinct text, so a split's size is proportional to what it holds (a fixed-width
string array would pad every caption to the longest one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gmpipe.artifacts import ArtifactError, read_json, read_npz

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REJECTED = "rejected.json"
STAGE = "prepare"
SPLIT_KEYS = ("images", "labels", "caption_bytes", "caption_offsets", "caption_index")


@dataclass(frozen=True)
class Rejected:
    """One line of ``rejected.json``: an input that was skipped (or changed), and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    captions: np.ndarray  # (N,) str objects (repeated captions share one string)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index], self.captions[index])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, carved): ``fraction`` of each class carved out, chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    kept, carved = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_carved = int(round(fraction * len(members)))
        if fraction > 0 and len(members) > 1:
            n_carved = min(max(n_carved, 1), len(members) - 1)
        carved.append(members[:n_carved])
        kept.append(members[n_carved:])
    none = [np.zeros(0, dtype=np.int64)]  # an empty split has no class: concatenate needs one array
    return np.sort(np.concatenate(kept + none)), np.sort(np.concatenate(carved + none))


def cap_per_class(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``limit`` items of each class (seeded choice), in original order."""
    if limit is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == label))[:limit] for label in np.unique(labels)]
    return np.sort(np.concatenate([*keep, np.zeros(0, dtype=np.int64)]))


def captions_array(captions) -> np.ndarray:
    """(N,) object array of str: what ``Split.captions`` holds."""
    array = np.empty(len(captions), dtype=object)
    array[:] = [str(caption) for caption in captions]
    return array


def write_split(directory: Path, name: str, split: Split) -> None:
    table, index = np.unique(split.captions.astype(object), return_inverse=True) if len(split) else ([], [])
    encoded = [str(caption).encode("utf-8") for caption in table]
    offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
    np.savez(directory / f"{name}.npz", images=split.images, labels=split.labels,
             caption_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8),
             caption_offsets=offsets, caption_index=np.asarray(index, dtype=np.int64).reshape(-1))


def load_split(directory: str | Path, name: str) -> Split:
    """Load one split, checked: a missing, truncated or inconsistent file names itself and the 'prepare' stage."""
    file = Path(directory) / f"{name}.npz"
    arrays = read_npz(file, STAGE, SPLIT_KEYS)
    images, labels, index = arrays["images"], arrays["labels"], arrays["caption_index"]
    offsets, data = arrays["caption_offsets"], arrays["caption_bytes"]
    problem = None
    if images.ndim != 4 or images.dtype != np.uint8:
        problem = f"images are {images.dtype} {images.shape}, expected uint8 (N, C, H, W)"
    elif labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        problem = f"labels are {labels.dtype} {labels.shape}, expected {len(images)} integers"
    elif index.shape != (len(images),) or offsets.ndim != 1 or len(offsets) < 1 or data.dtype != np.uint8:
        problem = "the caption table does not match the images"
    elif len(index) and (index.min() < 0 or index.max() >= len(offsets) - 1):
        problem = "a caption index points outside the caption table"
    elif offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) < 0).any():
        problem = "the caption offsets do not cover the caption bytes"
    if problem:
        raise ArtifactError(file, problem, STAGE)
    raw = data.tobytes()
    try:
        table = [raw[start:stop].decode("utf-8") for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]
    except UnicodeDecodeError:
        raise ArtifactError(file, "a caption is not UTF-8 text", STAGE) from None
    captions = np.empty(len(table), dtype=object)
    captions[:] = table
    return Split(images, labels.astype(np.int64), captions[index])


class Manifest(BaseModel):
    """What later stages read from ``manifest.json`` (other keys are kept for people and provenance)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    class_names: Annotated[list[str], Field(min_length=1)]
    image_size: Annotated[int, Field(ge=1)]
    channels: Annotated[int, Field(ge=1)]
    counts: dict


def load_manifest(directory: str | Path) -> dict:
    """``manifest.json`` as a dict, with the keys later stages use checked."""
    return read_json(Path(directory) / MANIFEST, STAGE, Manifest.model_validate).model_dump()
