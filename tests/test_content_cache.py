"""The content cache: where it lives, a round trip, and every entry that must not be trusted (truncated, its
tensors edited, another fingerprint's, the wrong tensors) ignored, rebuilt and replaced; switched off, nothing is
read or written; a cache that cannot be written costs only the recomputation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from gmpipe.content_cache import ContentCache, cache_root
from gmpipe.fingerprint import Fingerprint

FINGERPRINT = Fingerprint({"evaluate.seed": 0, "n": 3}, {"prepared/test.npz": "ab" * 32})


class Computation:
    """A computation that counts its runs and returns new tensors each time."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.runs += 1
        return {"features": torch.arange(6, dtype=torch.float64).reshape(3, 2) * self.runs,
                "accuracy": torch.tensor(0.5 + self.runs, dtype=torch.float64)}


def test_the_cache_folder_comes_from_the_environment(tmp_path):
    assert cache_root({"GMPIPE_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "gmpipe"
    assert cache_root({}) == Path.home() / ".cache" / "gmpipe"
    for off in ("off", "0", "False", "no"):
        assert cache_root({"GMPIPE_CACHE": off, "GMPIPE_CACHE_DIR": str(tmp_path)}) is None


def test_an_entry_is_reused_only_for_its_own_fingerprint(tmp_path):
    lines = []
    cache, compute = ContentCache(tmp_path, lines.append), Computation()
    first, hit = cache.get_or_compute("real_features", FINGERPRINT, compute)
    assert not hit and compute.runs == 1
    again, hit = cache.get_or_compute("real_features", FINGERPRINT, compute)
    assert hit and compute.runs == 1 and set(again) == set(first)
    torch.testing.assert_close(again["features"], first["features"], rtol=0, atol=0)
    assert again["accuracy"].dtype == torch.float64 and again["accuracy"].item() == 1.5

    other = FINGERPRINT.with_settings(n=4)  # another setting (or data, or code) is another entry
    _, hit = cache.get_or_compute("real_features", other, compute)
    assert not hit and compute.runs == 2
    assert len(list((tmp_path / "real_features").glob("*.safetensors"))) == 2
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def _stored(tmp_path) -> tuple[ContentCache, Path, list[str]]:
    lines: list[str] = []
    cache = ContentCache(tmp_path, lines.append)
    cache.get_or_compute("classifier", FINGERPRINT, Computation())
    return cache, cache.path("classifier", FINGERPRINT), lines


def _edit_tensor_bytes(file: Path) -> None:
    raw = bytearray(file.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of the last tensor's data; the header still parses
    file.write_bytes(bytes(raw))


def _other_fingerprints_entry(file: Path) -> None:
    other = FINGERPRINT.with_settings(n=99)
    metadata = {"fingerprint": json.dumps(other.to_dict()), "tensors_sha256": "0" * 64}
    file.write_bytes(save({"features": torch.zeros(3, 2)}, metadata=metadata))


@pytest.mark.parametrize("damage, reason", [
    (lambda file: file.write_bytes(file.read_bytes()[:40]), "unreadable"),
    (lambda file: file.write_bytes(b""), "unreadable"),
    (_edit_tensor_bytes, "do not match their recorded hash"),
    (_other_fingerprints_entry, "made by other settings, data or code"),
    (lambda file: file.write_bytes(save({"features": torch.zeros(1)})), "made by other settings"),
])
def test_a_damaged_or_foreign_entry_is_rebuilt_never_trusted(tmp_path, damage, reason):
    cache, file, lines = _stored(tmp_path)
    damage(file)
    compute = Computation()
    tensors, hit = cache.get_or_compute("classifier", FINGERPRINT, compute)
    assert not hit and compute.runs == 1 and tensors["accuracy"].item() == 1.5
    assert any(reason in line and str(file) in line for line in lines), lines
    _, hit = cache.get_or_compute("classifier", FINGERPRINT, compute)  # the rebuilt entry replaced it
    assert hit and compute.runs == 1


def test_tensors_the_caller_does_not_expect_are_rebuilt(tmp_path):
    cache, _, lines = _stored(tmp_path)
    compute = Computation()
    _, hit = cache.get_or_compute("classifier", FINGERPRINT, compute, fits=lambda tensors: "weights" in tensors)
    assert not hit and compute.runs == 1 and "not the tensors expected" in lines[-1]


def test_switched_off_nothing_is_read_or_written(tmp_path):
    ContentCache(tmp_path).get_or_compute("classifier", FINGERPRINT, Computation())
    compute = Computation()
    off = ContentCache(cache_root({"GMPIPE_CACHE": "off", "GMPIPE_CACHE_DIR": str(tmp_path)}))
    for _ in range(2):
        _, hit = off.get_or_compute("classifier", FINGERPRINT, compute)
        assert not hit
    assert compute.runs == 2 and len(list(tmp_path.rglob("*.safetensors"))) == 1


def test_an_unwritable_cache_costs_only_the_recomputation(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    lines = []
    tensors, hit = ContentCache(blocker, lines.append).get_or_compute("classifier", FINGERPRINT, Computation())
    assert not hit and tensors["accuracy"].item() == 1.5 and "could not write" in lines[-1]


def test_the_most_recently_written_entries_of_a_kind_are_kept(tmp_path):
    cache = ContentCache(tmp_path, keep=2)
    older = [FINGERPRINT.with_settings(n=n) for n in (1, 2)]
    for age, fingerprint in zip((200, 100), older, strict=True):
        cache.get_or_compute("classifier", fingerprint, Computation())
        os.utime(cache.path("classifier", fingerprint), (time.time() - age,) * 2)
    cache.get_or_compute("real_features", FINGERPRINT, Computation())  # another kind is counted apart
    cache.get_or_compute("classifier", FINGERPRINT, Computation())
    assert not cache.path("classifier", older[0]).exists()
    assert cache.path("classifier", older[1]).exists() and cache.path("classifier", FINGERPRINT).exists()
    assert cache.path("real_features", FINGERPRINT).exists()
