"""The prepared dataset on disk: what every later stage loads.

Layout of ``data/prepared/``::

    train.npz, val.npz, test.npz   images (N, C, H, W) uint8, labels (N,) int64, captions (N,) str
    manifest.json                  counts per split and class, class names, image size, channels, input hash
    rejected.json                  [{"file": ..., "reason": ...}] for every input that was skipped
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REJECTED = "rejected.json"


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    captions: np.ndarray  # (N,) unicode

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
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(carved))


def cap_per_class(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``limit`` items of each class (seeded choice), in original order."""
    if limit is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == label))[:limit] for label in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def write_split(directory: Path, name: str, split: Split) -> None:
    np.savez(directory / f"{name}.npz", images=split.images, labels=split.labels, captions=split.captions)


def load_split(directory: str | Path, name: str) -> Split:
    """Load one split; a missing folder names the stage that makes it."""
    file = Path(directory) / f"{name}.npz"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; run the 'prepare' stage first (gmpipe stage prepare)")
    with np.load(file, allow_pickle=False) as archive:
        return Split(archive["images"], archive["labels"], archive["captions"])


def load_manifest(directory: str | Path) -> dict:
    file = Path(directory) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; run the 'prepare' stage first (gmpipe stage prepare)")
    return json.loads(file.read_text())
