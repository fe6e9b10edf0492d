import numpy as np
import pytest

from gmpipe.eval.kid import kernel_distance, mmd2_unbiased, polynomial_kernel


def test_polynomial_kernel_formula():
    x, y = np.array([[1.0, 2.0]]), np.array([[3.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(polynomial_kernel(x, y), [[(1.0 / 2 + 1) ** 3, 1.0]])


def test_mmd2_unbiased_matches_explicit_sums():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    within_y = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / (4 * 3)
    across = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / (5 * 4)
    assert mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * across, rel=1e-10)


def test_same_distribution_is_near_zero():
    rng = np.random.default_rng(1)
    mean, std = kernel_distance(rng.normal(size=(600, 16)), rng.normal(size=(600, 16)), n_subsets=20, subset_size=200)
    assert abs(mean) < std


def test_different_distributions_are_positive_and_ordered():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(600, 16))
    near = kernel_distance(real, rng.normal(loc=0.3, size=(600, 16)), n_subsets=20, subset_size=200)
    far = kernel_distance(real, rng.normal(loc=1.0, size=(600, 16)), n_subsets=20, subset_size=200)
    assert near[0] > 3 * near[1]
    assert far[0] > near[0]


def test_deterministic_and_subset_size_capped():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(50, 4))
    assert kernel_distance(a, b, n_subsets=5, subset_size=1000, seed=7) == kernel_distance(
        a, b, n_subsets=5, subset_size=1000, seed=7
    )
    with pytest.raises(ValueError):
        kernel_distance(a, rng.normal(size=(50, 5)))


@pytest.mark.parametrize("n_subsets, subset_size", [(50, 150), (2, 20)])  # the whole sets' kernels; the subsets'
def test_every_estimate_is_the_mmd_of_its_subsets(n_subsets, subset_size):
    """Whichever way the kernels are computed (the whole sets' once, or each subset's), each estimate is
    ``mmd2_unbiased`` of the subsets drawn, up to float rounding: the same draws, in the same order."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(300, 64)), rng.normal(loc=0.2, size=(280, 64))
    draws = np.random.default_rng(9)
    expected = np.array([mmd2_unbiased(a[draws.choice(300, subset_size, replace=False)],
                                       b[draws.choice(280, subset_size, replace=False)]) for _ in range(n_subsets)])
    mean, std = kernel_distance(a, b, n_subsets=n_subsets, subset_size=subset_size, seed=9)
    assert mean == pytest.approx(expected.mean(), rel=1e-10) and std == pytest.approx(expected.std(), rel=1e-8)
