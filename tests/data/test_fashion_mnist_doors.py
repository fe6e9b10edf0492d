"""The Fashion-MNIST door: every malformed idx file is one error naming it, read no further than its header
promises; the gzip bomb runs through `gmpipe stage prepare` under a memory limit."""

from __future__ import annotations

import gzip
import shutil
import struct
import time
import zlib

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmpipe.config.data import DataConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.data.fashion_mnist import FILES, IdxFormatError, read_idx
from gmpipe.errors import GmpipeError
from gmpipe.paths import Paths
from gmpipe.stages import prepare
from tests.conftest import FIXTURE_FASHION_MNIST, smoke_params
from tests.hostile import assert_one_clear_line, run_limited, tree_snapshot

IMAGES, LABELS = FILES["train"]


def idx(dims, body: bytes | None = None, dtype: int = 0x08, ndim: int | None = None) -> bytes:
    header = bytes([0, 0, dtype, len(dims) if ndim is None else ndim]) + struct.pack(f">{len(dims)}I", *dims)
    return header + (bytes(int(np.prod(dims))) if body is None else body)


def labels_idx(values) -> bytes:
    return idx((len(values),), bytes(values))


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


# (id, file replaced, its new content, what the error says)
BAD_FILES = [
    ("label-out-of-range", LABELS, gz(labels_idx([0] * 1999 + [10])), "label 10 at index 1999 is out of range"),
    ("label-255", LABELS, gz(labels_idx([255] * 2000)), "out of range 0..9"),
    ("short-header", IMAGES, gz(b"\0\0\x08"), "the header ends after 3 of 4 bytes"),
    ("dims-cut-short", IMAGES, gz(b"\0\0\x08\x03" + struct.pack(">I", 2000)), "the header ends"),
    ("empty-gzip", IMAGES, gz(b""), "the header ends after 0 of 4 bytes"),
    ("zero-byte-file", IMAGES, b"", "the header ends after 0"),
    ("float-dtype", IMAGES, gz(idx((2000, 28, 28), dtype=0x0D)), "not an idx file of unsigned bytes"),
    ("bad-magic", IMAGES, gz(b"\x1f\x8b" + idx((2000, 28, 28))[2:]), "not an idx file"),
    ("images-2d", IMAGES, gz(idx((2000, 784))), "has 2 dimensions, expected 3"),
    ("labels-2d", LABELS, gz(idx((2000, 1))), "has 2 dimensions, expected 1"),
    ("images-32x32", IMAGES, gz(idx((2000, 32, 32))), "images are 32x32, expected 28x28"),
    ("fewer-labels", LABELS, gz(labels_idx([1] * 1500)), "1500 labels for 2000 images"),
    ("no-images", IMAGES, gz(idx((0, 28, 28))), "holds no images"),
    ("truncated-body", IMAGES, gz(idx((2000, 28, 28))[:-100]), "ends after"),
    ("trailing-data", IMAGES, gz(idx((2000, 28, 28)) + b"\0" * 10), "more data than its header promises"),
    ("huge-promise", IMAGES, gz(idx((4_000_000_000, 28, 28), body=b"")), "more than"),
    ("max-dims-promise", IMAGES, gz(bytes([0, 0, 8, 255]) + b"\xff" * 1020), "has 255 dimensions"),
    ("not-gzip", IMAGES, idx((2000, 28, 28)), "cannot be read"),
    ("gzip-cut", IMAGES, gz(idx((2000, 28, 28)))[:200], "cannot be read"),
    ("gzip-bad-crc", IMAGES, gz(idx((2000, 28, 28)))[:-8] + b"\0" * 8, "cannot be read"),
    ("random-bytes", IMAGES, bytes(range(256)) * 4, "cannot be read"),
]


def _copy_fixture(folder):
    shutil.copytree(FIXTURE_FASHION_MNIST, folder)
    return folder


@pytest.mark.parametrize(("name", "content", "message"), [row[1:] for row in BAD_FILES],
                         ids=[row[0] for row in BAD_FILES])
def test_bad_idx_file_is_one_error_naming_it(tmp_path, name, content, message):
    data_dir = _copy_fixture(tmp_path / "fmnist")
    # the train split of the fixture has 2,000 items: the rows above keep the other file consistent with that
    (data_dir / name).write_bytes(content)
    paths = Paths(tmp_path / "project")
    with pytest.raises(GmpipeError) as caught:
        prepare.run(DataConfig(path=str(data_dir)), PrepareConfig(), paths)
    text = str(caught.value)
    assert name in text and message in text and "\n" not in text
    assert "replace it with the original file" in text
    assert not paths.prepared.exists()


def test_reads_no_further_than_the_header_promises(tmp_path):
    """A 1 GB gzip bomb behind a header that promises 10 x 28 x 28 bytes: refused after reading 7,841 bytes."""
    zeros = gzip.compress(bytes(64 * 2**20), compresslevel=9)  # 64 MiB of zeros in ~64 KB
    (tmp_path / "bomb.gz").write_bytes(gz(idx((10, 28, 28))) + zeros * 16)
    start = time.perf_counter()
    with pytest.raises(IdxFormatError, match="more data than its header promises"):
        read_idx(tmp_path / "bomb.gz", expected_ndim=3)
    assert time.perf_counter() - start < 2.0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.binary(min_size=0, max_size=4), dims=st.lists(st.integers(0, 2**32 - 1), max_size=4),
       body=st.binary(max_size=300), compress=st.booleans())
def test_random_idx_headers_are_read_or_refused(tmp_path, magic, dims, body, compress):
    raw = magic + b"".join(struct.pack(">I", d) for d in dims) + body
    file = tmp_path / ("x.gz" if compress else "x.idx")
    file.write_bytes(gz(raw) if compress else raw)
    try:
        array = read_idx(file)
    except IdxFormatError as exc:
        assert str(file) in str(exc)
        return
    assert array.dtype == np.uint8 and array.size == len(raw) - 4 - 4 * array.ndim


def test_gzip_bomb_through_the_cli_under_a_memory_limit(prefect_api, tmp_path):
    """The 2 GB bomb that was once decompressed whole: now refused after what its header promises, within the
    memory limit and a few seconds, with one line naming the file; the previous prepared data is intact."""
    project = tmp_path / "project"
    params = smoke_params()
    prepare.run(DataConfig(path=str(FIXTURE_FASHION_MNIST)), PrepareConfig(max_per_class=3), Paths(project))
    before = tree_snapshot(project / "data/prepared")
    data_dir = _copy_fixture(tmp_path / "fmnist")
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    with open(data_dir / IMAGES, "wb") as handle:
        handle.write(gz(idx((2000, 28, 28))))
        member = zeros.compress(bytes(64 * 2**20)) + zeros.flush()
        for _ in range(32):  # 32 gzip members of 64 MiB of zeros: 2 GiB decompressed, ~2 MB on disk
            handle.write(member)
    params["data"]["path"] = str(data_dir)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_limited(["gmpipe", "stage", "prepare"], project, timeout=120)
    assert not result.timed_out
    line = assert_one_clear_line(result, str(data_dir / IMAGES), "more data than its header promises")
    assert "replace it" in line
    assert result.max_rss < 600 * 2**20, result.max_rss
    assert tree_snapshot(project / "data/prepared") == before
