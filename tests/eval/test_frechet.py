import numpy as np
import pytest
import scipy.linalg

from gmpipe.eval.frechet import feature_statistics, frechet_distance, frechet_distance_from_features

DIM = 8
NUM_CLASSES = 10


def gaussian_mixture(rng: np.random.Generator, per_class: int, classes=range(NUM_CLASSES)) -> np.ndarray:
    """Features (per_class * len(classes), DIM): one isotropic Gaussian per class around fixed centres."""
    centres = np.random.default_rng(1234).normal(scale=3.0, size=(NUM_CLASSES, DIM))
    return np.concatenate([centres[c] + rng.normal(size=(per_class, DIM)) for c in classes])


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T + dim * np.eye(dim)


def test_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # For commuting covariances the trace term is sum (sqrt(var1) - sqrt(var2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_closed_form_for_scaled_full_covariance():
    rng = np.random.default_rng(0)
    sigma, mu1, mu2, scale = random_spd(rng, 6), rng.normal(size=6), rng.normal(size=6), 1.7
    # Sigma_2 = c^2 Sigma_1  =>  Tr(S1 + S2 - 2 (S1 S2)^(1/2)) = (1 - c)^2 Tr S1.
    expected = np.sum((mu1 - mu2) ** 2) + (1.0 - scale) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, scale**2 * sigma) == pytest.approx(expected, rel=1e-8)


def test_symmetric_and_one_dimensional():
    assert frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(
        3.0**2 + (2.0 - 1.0) ** 2
    )
    rng = np.random.default_rng(1)
    s1, s2, m1, m2 = random_spd(rng, 5), random_spd(rng, 5), rng.normal(size=5), rng.normal(size=5)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-8)


def test_sample_estimate_approaches_closed_form():
    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(20000, 3))
    f2 = rng.normal(loc=1.0, scale=2.0, size=(20000, 3))
    assert frechet_distance_from_features(f1, f2) == pytest.approx(3 * 1.0 + 3 * (2.0 - 1.0) ** 2, rel=0.03)


def test_feature_statistics_shapes():
    mu, sigma = feature_statistics(np.arange(12.0).reshape(4, 3))
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    with pytest.raises(ValueError):
        feature_statistics(np.zeros(5))


def test_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(3)
    real = gaussian_mixture(rng, per_class=100)
    assert abs(frechet_distance_from_features(real, real)) < 1e-6
    distances = [frechet_distance_from_features(real, real + rng.normal(scale=s, size=real.shape)) for s in (0.3, 1, 3)]
    assert distances[0] < distances[1] < distances[2]


def test_grows_with_dropped_classes():
    rng = np.random.default_rng(4)
    real = gaussian_mixture(rng, per_class=100)
    floor = frechet_distance_from_features(real, gaussian_mixture(rng, per_class=100))
    dropped = [
        frechet_distance_from_features(real, gaussian_mixture(rng, per_class=100, classes=range(NUM_CLASSES - n)))
        for n in (2, 5, 8)
    ]
    assert floor < dropped[0] < dropped[1] < dropped[2]
    assert dropped[0] > 5 * floor


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_singular_covariances_stay_finite():
    # Fewer samples than dimensions: both covariances are rank-deficient, as with 1280-d features on small sets.
    rng = np.random.default_rng(5)
    value = frechet_distance_from_features(rng.normal(size=(10, 32)), rng.normal(size=(12, 32)))
    assert np.isfinite(value) and value > 0


def test_mismatched_statistics_are_refused():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize(("n1", "n2", "dim"), [(40, 60, 8), (30, 25, 64), (200, 150, 16)])
def test_feature_route_matches_sqrtm_route(n1, n2, dim):
    """The exact nuclear-norm route used for features agrees with sqrtm on the fitted statistics."""
    from gmpipe.eval.frechet import trace_sqrt_product

    rng = np.random.default_rng(n1 + dim)
    a = rng.normal(size=(n1, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    b = rng.normal(size=(n2, dim)) * 1.5 + 0.4
    sigma_a, sigma_b = feature_statistics(a)[1], feature_statistics(b)[1]
    expected_trace = float(np.trace(scipy.linalg.sqrtm(sigma_a @ sigma_b)).real)
    assert trace_sqrt_product(a, b) == pytest.approx(expected_trace, rel=1e-6)
    if min(n1, n2) > dim:  # full-rank covariances: sqrtm is well conditioned there
        statistics = frechet_distance(*feature_statistics(a), *feature_statistics(b))
        assert frechet_distance_from_features(a, b) == pytest.approx(statistics, rel=1e-6)


@pytest.mark.parametrize(("n1", "n2", "dim"), [(30, 25, 64), (200, 150, 16)])
def test_feature_route_is_the_formula_on_the_fitted_statistics(n1, n2, dim):
    """The traces of the covariances, taken without forming them, give the formula's value on the full statistics
    (the trace of the square root as ``trace_sqrt_product`` computes it), fewer or more samples than dimensions."""
    from gmpipe.eval.frechet import trace_sqrt_product

    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(n1, dim)) * 0.7, rng.normal(size=(n2, dim)) + 0.2
    (mu_a, sigma_a), (mu_b, sigma_b) = feature_statistics(a), feature_statistics(b)
    expected = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt_product(a, b)
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-12)
