"""The prepare stage on the committed Fashion-MNIST fixture and on a generated, messy image folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gmpipe.config.data import DataConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.data import image_folder
from gmpipe.data.prepared import load_manifest, load_split
from gmpipe.errors import GmpipeError
from gmpipe.paths import Paths
from gmpipe.stages import prepare
from tests.conftest import FIXTURE_FASHION_MNIST


def test_fashion_mnist_fixture(tmp_path):
    paths = Paths(tmp_path)
    summary = prepare.run(DataConfig(path=str(FIXTURE_FASHION_MNIST)), PrepareConfig(val_fraction=0.1), paths)
    manifest = load_manifest(paths.prepared)
    assert manifest["counts"]["train"]["total"] == 1800
    assert manifest["counts"]["val"]["total"] == 200
    assert manifest["counts"]["test"]["total"] == 500  # the official test split is kept whole
    assert set(manifest["counts"]["val"]["per_class"].values()) == {20}
    assert summary["counts"] == {"train": 1800, "val": 200, "test": 500}
    train = load_split(paths.prepared, "train")
    assert train.images.shape == (1800, 1, 32, 32) and train.images.dtype == np.uint8
    # 28 -> 32 by zero padding: the border is exactly background.
    assert train.images[:, :, :2].max() == 0 and train.images[:, :, :, -2:].max() == 0
    assert train.captions[0].startswith("a photo of a ")
    assert len(manifest["input_sha256"]) == 64


def test_splits_are_seeded_and_disjoint(tmp_path):
    data = DataConfig(path=str(FIXTURE_FASHION_MNIST), image_size=28, channels=3)
    prepare.run(data, PrepareConfig(seed=3), Paths(tmp_path / "a"))
    prepare.run(data, PrepareConfig(seed=3), Paths(tmp_path / "b"))
    a_val, b_val = load_split(tmp_path / "a/data/prepared", "val"), load_split(tmp_path / "b/data/prepared", "val")
    assert a_val.images.shape[1:] == (3, 28, 28)
    np.testing.assert_array_equal(a_val.images, b_val.images)
    train = load_split(tmp_path / "a/data/prepared", "train")
    train_rows = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in train_rows for row in a_val.images)


def test_max_per_class(tmp_path):
    prepare.run(DataConfig(path=str(FIXTURE_FASHION_MNIST)), PrepareConfig(max_per_class=7), Paths(tmp_path))
    counts = load_manifest(Paths(tmp_path).prepared)["counts"]
    assert all(set(counts[s]["per_class"].values()) == {7} for s in ("train", "val", "test"))


def _write_messy_folder(root):
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), "L").save(root / "cat/grey.png")
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB").save(root / "cat/rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(root / "cat/rgba.png")
    Image.fromarray(rng.integers(0, 255, (33, 17, 3), dtype=np.uint8), "RGB").convert("P").save(root / "cat/pal.png")
    Image.fromarray(np.full((24, 24), 65535, dtype=np.uint16)).save(root / "cat/white16.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8), "RGB").save(root / "dog/photo.webp")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "CMYK").save(root / "dog/cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (300, 300), dtype=np.uint8), "L").save(root / "dog/huge.png")
    (root / "dog/empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(root / "dog/full.png")
    data = (root / "dog/full.png").read_bytes()
    (root / "dog/truncated.png").write_bytes(data[: len(data) // 2])
    (root / "dog/notes.txt").write_text("not an image")
    (root / "captions.jsonl").write_text(
        json.dumps({"file": "cat/grey.png", "caption": "a grey cat"}) + "\n{broken\n"
    )


def test_messy_image_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(image_folder, "MAX_PIXELS", 50_000)
    root = tmp_path / "images"
    _write_messy_folder(root)
    paths = Paths(tmp_path / "project")
    data = DataConfig(source="image_folder", path=str(root), image_size=16, channels=3)
    summary = prepare.run(data, PrepareConfig(val_fraction=0.0, test_fraction=0.0), paths)
    reasons = {r["file"]: r["reason"] for r in json.loads((paths.prepared / "rejected.json").read_text())}
    assert reasons["dog/empty.png"].startswith("empty file")
    assert reasons["dog/truncated.png"].startswith("truncated or corrupt")
    assert reasons["dog/notes.txt"].startswith("not an image")
    assert reasons["dog/huge.png"].startswith("too large")
    assert reasons["captions.jsonl:2"].startswith("not a")
    assert summary["counts"]["train"] == 8 and summary["classes"] == 2
    train = load_split(paths.prepared, "train")
    assert train.images.shape == (8, 3, 16, 16)
    assert "a grey cat" in set(train.captions) and "a photo of a dog" in set(train.captions)
    assert load_manifest(paths.prepared)["class_names"] == ["cat", "dog"]


def test_sixteen_bit_is_scaled_not_clipped():
    image = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # mid grey in 16 bits
    array = image_folder.convert_image(image, channels=1, size=8)
    assert array.shape == (1, 8, 8) and abs(int(array.mean()) - 128) <= 1


def test_transparency_uses_background():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    array = image_folder.convert_image(image, channels=3, size=10, background=7)
    assert (array == 7).all()


def test_nothing_valid_is_a_clear_error_and_keeps_old_output(tmp_path):
    paths = Paths(tmp_path / "project")
    prepare.run(DataConfig(path=str(FIXTURE_FASHION_MNIST)), PrepareConfig(max_per_class=2), paths)
    before = (paths.prepared / "manifest.json").read_text()
    root = tmp_path / "junk"
    (root / "a").mkdir(parents=True)
    (root / "a/x.png").write_text("nope")
    with pytest.raises(GmpipeError, match="no usable images"):
        prepare.run(DataConfig(source="image_folder", path=str(root)), PrepareConfig(), paths)
    assert (paths.prepared / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (DataConfig(path="/does/not/exist"), "Fashion-MNIST file not found"),
        (DataConfig(source="image_folder", path="/does/not/exist"), "image folder not found"),
    ],
)
def test_missing_source_named(tmp_path, data, match):
    with pytest.raises(GmpipeError, match=match):
        prepare.run(data, PrepareConfig(), Paths(tmp_path))
