"""The image-folder door: every bad file or entry is skipped and listed with its reason, never a crash; decoding is
bounded before a pixel is decoded; the nasty files run through `gmpipe stage prepare` under a memory limit."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gmpipe.config.data import DataConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.data import image_folder
from gmpipe.data.prepared import Rejected, load_manifest, load_split
from gmpipe.paths import Paths
from gmpipe.stages import prepare
from tests.conftest import smoke_params
from tests.hostile import run_limited


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, color_type: int = 0, raw: bytes | None = None, extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk: IHDR says width x height (8-bit; colour type 0 grey, 6 RGBA); ``raw`` is the
    filtered pixel data (default: only a few bytes, enough for the header to be read)."""
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    body = zlib.compress(raw if raw is not None else b"\0" * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", body)
            + png_chunk(b"IEND", b""))


def strip_png(length: int = 1_000_000) -> bytes:
    """A real, decodable 1 x ``length`` grey PNG of a few KB (each row: filter byte + one pixel)."""
    return png_bytes(1, length, raw=b"\0\x80" * length)


def image_bytes(mode: str = "RGB", size=(12, 10), fmt: str = "PNG", **save) -> bytes:
    rng = np.random.default_rng(0)
    bands = len(Image.new(mode, (1, 1)).getbands())
    array = rng.integers(0, 255, (size[1], size[0], bands) if bands > 1 else (size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, "RGBA" if bands == 4 else "RGB" if bands == 3 else "L").convert(mode).save(
        buffer, fmt, **save)
    return buffer.getvalue()


def write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def good_folder(root: Path) -> Path:
    """Two classes with two good images each: the background every bad entry is added to."""
    for name in ("cat/a.png", "cat/b.jpg", "dog/a.png", "dog/b.webp"):
        write(root, name, image_bytes(fmt={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]))
    return root


def _fifo(root: Path) -> None:
    os.mkfifo(root / "cat" / "pipe.png")


def _link_to_folder(root: Path) -> None:
    elsewhere = root.parent / "elsewhere"  # outside the image folder: a link could lead anywhere, even to a loop
    write(elsewhere, "x.png", image_bytes())
    os.symlink(elsewhere, root / "cat" / "linked", target_is_directory=True)


def _broken_link(root: Path) -> None:
    os.symlink(root / "nowhere.png", root / "cat" / "gone.png")


def _link_to_device(root: Path) -> None:
    os.symlink("/dev/zero", root / "cat" / "zero.png")


def _non_utf8_corrupt(root: Path) -> None:
    (root / "cat").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(b"not an image")


def _png_text_bomb(root: Path) -> None:
    text = b"Comment\0\0" + zlib.compress(b"\0" * (64 * 2**20), 9)  # zTXt: 64 MiB of text in ~64 KB
    write(root, "cat/textbomb.png", png_bytes(4, 4, raw=b"\0\0\0\0\0" * 4, extra=png_chunk(b"zTXt", text)))


def _truncated(fmt: str):
    def make(root: Path) -> None:
        data = image_bytes(size=(64, 64), fmt=fmt)
        write(root, f"cat/cut.{fmt.lower()}", data[: len(data) // 2])

    return make


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (id, how to make the bad entry, file listed in rejected.json, reason it must give)
BAD_ENTRIES = [
    ("strip-1x1000000", lambda r: write(r, "cat/strip.png", strip_png()), "cat/strip.png", "too elongated"),
    ("strip-1000000x1", lambda r: write(r, "cat/wide.png", png_bytes(1_000_000, 1)), "cat/wide.png", "too elongated"),
    ("header-30000x30000", lambda r: write(r, "cat/bomb.png", png_bytes(30_000, 30_000)), "cat/bomb.png",
     "too large"),
    ("rgba-7800x7800-bytes", lambda r: write(r, "cat/rgba.png", png_bytes(7800, 7800, 6)), "cat/rgba.png",
     "decodes to"),
    ("png-text-bomb", _png_text_bomb, "cat/textbomb.png", "corrupt"),
    ("zero-bytes", lambda r: write(r, "cat/empty.png", b""), "cat/empty.png", "empty file"),
    ("text-as-png", lambda r: write(r, "cat/notes.png", b"hello"), "cat/notes.png", "not an image"),
    # fixed junk: about 1 in 400 random tails parses as a chunk that runs past the end ("truncated or corrupt")
    ("png-signature-then-junk", lambda r: write(r, "cat/junk.png", PNG_SIGNATURE + random.Random(0).randbytes(200)),
     "cat/junk.png", "not an image"),
    ("truncated-png", _truncated("PNG"), "cat/cut.png", "truncated or corrupt"),
    ("truncated-jpeg", _truncated("JPEG"), "cat/cut.jpeg", "truncated or corrupt"),
    ("hidden-file", lambda r: write(r, "cat/.hidden.png", image_bytes()), "cat/.hidden.png", "hidden"),
    ("notebook-checkpoints", lambda r: write(r, "cat/.ipynb_checkpoints/a-checkpoint.png", image_bytes()),
     "cat/.ipynb_checkpoints/", "hidden"),
    ("top-level-hidden-folder", lambda r: write(r, ".git/x.png", image_bytes()), ".git/", "hidden"),
    ("ds-store", lambda r: write(r, ".DS_Store", b"\0\0\0\1Bud1"), ".DS_Store", "hidden"),
    ("macosx-folder", lambda r: write(r, "__MACOSX/cat/._a.png", b"\0\5\26\7"), "__MACOSX/", "macOS"),
    ("file-beside-classes", lambda r: write(r, "README.txt", b"my data"), "README.txt", "not in a class folder"),
    ("empty-class-folder", lambda r: (r / "empty").mkdir(), "empty/", "not a class"),
    ("class-of-broken-files", lambda r: write(r, "bad/x.png", b"nope"), "bad/", "not a class"),
    ("fifo", _fifo, "cat/pipe.png", "not a regular file"),
    ("link-to-device", _link_to_device, "cat/zero.png", "not a regular file"),
    ("broken-link", _broken_link, "cat/gone.png", "broken link"),
    ("link-to-folder", _link_to_folder, "cat/linked/", "not followed"),
    ("non-utf8-name", _non_utf8_corrupt, "cat/caf\\xe9.png", "not an image"),
]


@pytest.mark.parametrize(("make", "listed", "reason"), [row[1:] for row in BAD_ENTRIES],
                         ids=[row[0] for row in BAD_ENTRIES])
def test_bad_entry_is_skipped_and_listed(tmp_path, make, listed, reason):
    root = good_folder(tmp_path / "images")
    make(root)
    paths = Paths(tmp_path / "project")
    data = DataConfig(source="image_folder", path=str(root), image_size=8, channels=3)
    summary = prepare.run(data, PrepareConfig(val_fraction=0.0, test_fraction=0.0), paths)
    rejected = {r["file"]: r["reason"] for r in json.loads((paths.prepared / "rejected.json").read_text())}
    assert listed in rejected, rejected
    assert reason in rejected[listed]
    assert summary["counts"]["train"] == 4 and load_manifest(paths.prepared)["class_names"] == ["cat", "dog"]
    assert any(r["file"] == listed for r in summary["rejected"])  # the Prefect artifact lists it too


def test_non_utf8_names_are_kept_and_hashed(tmp_path):
    root = good_folder(tmp_path / "images")
    folder = root / os.fsdecode(b"gr\xfcn")
    folder.mkdir()
    folder.joinpath(os.fsdecode(b"\xff.png")).write_bytes(image_bytes())
    paths = Paths(tmp_path / "project")
    data = DataConfig(source="image_folder", path=str(root), image_size=8, channels=1)
    prepare.run(data, PrepareConfig(val_fraction=0.0, test_fraction=0.0), paths)
    manifest = load_manifest(paths.prepared)
    assert manifest["class_names"] == ["cat", "dog", "gr\\xfcn"]
    assert "a photo of a gr\\xfcn" in set(load_split(paths.prepared, "train").captions)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, left half black; EXIF 6 says "rotate 90 degrees clockwise to view": upright, the black
    # half is on top.
    array = np.zeros((16, 32), np.uint8)
    array[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array, "L").save(tmp_path / "phone.png", exif=exif)
    out = image_folder.load_image(tmp_path / "phone.png", channels=1, size=16)
    assert out[0, :6].mean() < 10 and out[0, -6:].mean() > 245


def test_strip_is_never_upscaled(tmp_path):
    """The 2 KB strip is refused from its header: nothing near 32 x 32,000,000 is ever allocated."""
    (tmp_path / "strip.png").write_bytes(strip_png())
    assert (tmp_path / "strip.png").stat().st_size < 10_000
    result = image_folder.load_image(tmp_path / "strip.png", channels=1, size=32)
    assert isinstance(result, Rejected) and "too elongated" in result.reason


def test_large_jpeg_decodes_at_reduced_scale(tmp_path, monkeypatch):
    """A JPEG larger than the pixel cap is decoded at 1/8 scale (JPEG draft) and accepted."""
    (tmp_path / "big.jpg").write_bytes(image_bytes(size=(800, 640), fmt="JPEG"))
    monkeypatch.setattr(image_folder, "MAX_PIXELS", 100_000)
    out = image_folder.load_image(tmp_path / "big.jpg", channels=3, size=32)
    assert out.shape == (3, 32, 32)
    (tmp_path / "big.png").write_bytes(image_bytes(size=(800, 640)))
    assert isinstance(image_folder.load_image(tmp_path / "big.png", channels=3, size=32), Rejected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ",
                               b"II*\0", b"BM", b"P5\n"]),
       body=st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(tmp_path, prefix, body):
    file = tmp_path / "x.img"
    file.write_bytes(prefix + body)
    result = image_folder.load_image(file, channels=3, size=8)
    assert isinstance(result, Rejected) or result.shape == (3, 8, 8)


def test_bombs_through_the_cli_under_a_memory_limit(prefect_api, tmp_path):
    """`gmpipe stage prepare` on a folder of decompression bombs, under RLIMIT_AS = 1.5 GB: it finishes quickly,
    lists every bomb, and its peak memory stays far below the limit."""
    root = good_folder(tmp_path / "images")
    write(root, "cat/strip.png", strip_png())
    write(root, "cat/bomb.png", png_bytes(30_000, 30_000))
    write(root, "cat/rgba.png", png_bytes(7800, 7800, 6))
    _png_text_bomb(root)
    # A real 6000 x 6000 image of ~40 KB: within the limits, so decoded (36 MB) and kept.
    write(root, "dog/big.png", png_bytes(6000, 6000, raw=b"\0" * (6001 * 6000)))
    project = tmp_path / "project"
    project.mkdir()
    params = smoke_params(data={"source": "image_folder", "path": str(root), "image_size": 8, "channels": 1},
                          prepare={"val_fraction": 0.0, "test_fraction": 0.0})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_limited(["gmpipe", "stage", "prepare"], project, timeout=120)
    assert result.returncode == 0 and not result.timed_out, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    rejected = {r["file"] for r in json.loads((project / "data/prepared/rejected.json").read_text())}
    assert {"cat/strip.png", "cat/bomb.png", "cat/rgba.png", "cat/textbomb.png"} <= rejected
    assert load_manifest(project / "data/prepared")["counts"]["train"]["per_class"] == {"cat": 2, "dog": 3}
    assert result.max_rss < 700 * 2**20, result.max_rss
