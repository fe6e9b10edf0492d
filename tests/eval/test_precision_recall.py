import numpy as np
import pytest
import torch

from gmpipe.eval.precision_recall import knn_radii, manifold_coverage, precision_recall

DIM = 4


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(800, DIM))


def test_knn_radii_match_brute_force():
    points = torch.tensor(np.random.default_rng(1).normal(size=(40, 3)))
    distances = torch.cdist(points, points)
    expected = distances.sort(dim=1).values[:, 3]  # column 0 is the point itself
    torch.testing.assert_close(knn_radii(points, k=3, batch_size=7), expected)


def test_manifold_coverage_on_a_line():
    support = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    radii = torch.tensor([1.0, 2.0], dtype=torch.float64)
    queries = torch.tensor([[0.5], [1.5], [7.5], [12.0]], dtype=torch.float64)
    assert manifold_coverage(queries, support, radii) == pytest.approx(0.5)  # 0.5 inside, 12.0 on the boundary


def test_same_distribution_has_high_precision_and_recall(real):
    result = precision_recall(real, np.random.default_rng(2).normal(size=(800, DIM)), batch_size=300)
    assert result.precision > 0.8 and result.recall > 0.8


def test_mode_collapse_keeps_precision_and_loses_recall(real):
    collapsed = np.random.default_rng(3).normal(scale=0.2, size=(800, DIM))
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.3


def test_overdispersed_generator_keeps_recall_and_loses_precision(real):
    spread = np.random.default_rng(4).normal(scale=3.0, size=(800, DIM))
    precision, recall = precision_recall(real, spread)
    assert precision < 0.3 and recall > 0.9


def test_shifted_generator_loses_both(real):
    shifted = np.random.default_rng(5).normal(loc=4.0, size=(800, DIM))
    precision, recall = precision_recall(real, shifted)
    assert precision < 0.1 and recall < 0.1


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_one_pass_over_the_distances_is_both_coverages(batch_size):
    """Precision and recall from one pass over the generated-to-real distances are the two manifold coverages."""
    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.normal(size=(60, 8)))
    generated = torch.from_numpy(rng.normal(size=(45, 8)) * 1.3 + 0.2)
    result = precision_recall(real, generated, k=3, batch_size=batch_size)
    assert result.precision == manifold_coverage(generated, real, knn_radii(real, 3))
    assert result.recall == manifold_coverage(real, generated, knn_radii(generated, 3))
    assert 0 < result.precision < 1 and 0 < result.recall < 1
