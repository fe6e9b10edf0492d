"""The real-data side of evaluate, cached by content: a second run reads exactly what the first computed (features,
the classifier and its accuracy), and other data, another setting or the cache switched off computes it again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmpipe.content_cache import ContentCache
from gmpipe.data.prepared import Split
from gmpipe.eval.classifier import predict
from gmpipe.eval.real_data import data_hashes, real_classifier, real_features, select_real
from gmpipe.nn.features import EffNetLite0Features

CPU = torch.device("cpu")


def _split(seed: int, n: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 1, 16, 16), dtype=np.uint8), np.arange(n) % 3,
                 np.array([""] * n, dtype=object))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    train, test = _split(0, 24), _split(1, 12)
    for name, split in (("train", train), ("test", test)):
        np.savez(folder / f"{name}.npz", images=split.images, labels=split.labels)
    return folder, train, test


@pytest.fixture(scope="module")
def extractor():
    return EffNetLite0Features(image_size=32)


def test_a_second_run_reads_the_features_the_first_computed(prepared, extractor, tmp_path):
    folder, train, test = prepared
    selection = select_real(0, len(test), len(train), 10, {6, 10}, 8)
    assert len(selection.test_order) == 10 and sorted(selection.floor_orders) == [6, 10]
    cache = ContentCache(tmp_path)
    first = real_features(extractor, train, test, selection, data_hashes(folder), 0, 4, CPU, cache)
    second = real_features(extractor, train, test, selection, data_hashes(folder), 0, 7, CPU, cache)
    assert not first.cached and second.cached  # the batch size is not in the key
    np.testing.assert_array_equal(second.test, first.test)
    assert second.test.dtype == np.float64 and second.test.shape == (10, 1280)
    for n in (6, 10):
        np.testing.assert_array_equal(second.floor[n], first.floor[n])
    for stored, computed in zip(second.autoencoder, first.autoencoder, strict=True):
        assert stored.shape == (8, 1280)
        np.testing.assert_array_equal(stored, computed)
    np.testing.assert_allclose(first.test, extractor.extract(
        torch.from_numpy(test.images[selection.test_order]).float() / 127.5 - 1), rtol=0, atol=1e-5)

    # Other data (one byte of the test split), another seed or the cache switched off: computed again.
    changed = dict(data_hashes(folder), **{f"{folder.name}/test.npz": "0" * 64})
    assert not real_features(extractor, train, test, selection, changed, 0, 4, CPU, cache).cached
    other = select_real(1, len(test), len(train), 10, {6, 10}, 8)
    assert not real_features(extractor, train, test, other, data_hashes(folder), 1, 4, CPU, cache).cached
    assert not real_features(extractor, train, test, selection, data_hashes(folder), 0, 4, CPU,
                             ContentCache(None)).cached


def test_a_second_run_reads_the_classifier_the_first_trained(prepared, tmp_path):
    folder, train, test = prepared
    cache = ContentCache(tmp_path)
    first = real_classifier(train, test, 3, 4, 8, 0, data_hashes(folder), CPU, cache)
    second = real_classifier(train, test, 3, 4, 8, 0, data_hashes(folder), CPU, cache)
    assert not first.cached and second.cached
    assert second.test_accuracy == first.test_accuracy and second.test_n == len(test)
    images = torch.from_numpy(test.images).float() / 127.5 - 1
    torch.testing.assert_close(predict(second.model, images), predict(first.model, images), rtol=0, atol=0)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=0, atol=0)
    assert not real_classifier(train, test, 3, 5, 8, 0, data_hashes(folder), CPU, cache).cached  # more steps
    bf16 = real_classifier(train, test, 3, 4, 8, 0, data_hashes(folder), CPU, cache, precision="bf16")
    assert not bf16.cached  # another training precision is another classifier
    assert real_classifier(train, test, 3, 4, 8, 0, data_hashes(folder), CPU, cache, precision="bf16").cached
