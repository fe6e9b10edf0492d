import gzip

import numpy as np
import pytest

from gmpipe.data.fashion_mnist import IdxFormatError, load_split, read_idx, write_idx
from tests.conftest import FIXTURE_FASHION_MNIST


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((5, 4, 4), dtype=np.uint8))
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(IdxFormatError, match="ends after 70 of 80 bytes"):
        read_idx(tmp_path / "b.gz")


def test_fixture_has_every_class():
    images, labels = load_split(FIXTURE_FASHION_MNIST, "test")
    assert images.shape == (500, 28, 28)
    assert np.bincount(labels).tolist() == [50] * 10
