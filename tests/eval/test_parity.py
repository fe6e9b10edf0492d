"""gmpipe's metrics against the libraries people trust, on the same inputs: the Frechet distance and KID against
torchmetrics given the same feature extractor (a custom ``feature=`` module, offline), improved precision and
recall against a brute-force reading of Kynkaanniemi et al. (2019), PSNR and SSIM against torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

from gmpipe.data.fashion_mnist import load_split
from gmpipe.eval.frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from gmpipe.eval.kid import kernel_distance, mmd2_unbiased
from gmpipe.eval.precision_recall import precision_recall
from gmpipe.eval.reconstruction import psnr_per_image, ssim_per_image
from gmpipe.pixels import uint8_to_signed
from tests.conftest import FIXTURE_FASHION_MNIST

N = 240  # images per set
HALF_WINDOW = 5  # of the 11 x 11 SSIM window


class FrozenFeatures(nn.Module):
    """A small frozen random CNN, images (B, 1, H, W) in [-1, 1] -> features (B, 32): the extractor both sides use.
    ``num_features`` tells torchmetrics the width without a trial pass."""

    num_features = 32

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2),
                                 nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.double())


@pytest.fixture(scope="module")
def image_sets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real Fashion-MNIST test images, other real (train) images, and a degraded copy of those ("generated"),
    (N, 1, 28, 28) each in [-1, 1]."""
    test, _ = load_split(FIXTURE_FASHION_MNIST, "test")
    train, _ = load_split(FIXTURE_FASHION_MNIST, "train")
    real = uint8_to_signed(torch.from_numpy(test[:N].copy()).unsqueeze(1)).double()
    other = uint8_to_signed(torch.from_numpy(train[:N].copy()).unsqueeze(1)).double()
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    degraded = (0.7 * other + 0.3 * noise).clamp(-1, 1)
    return real, other, degraded


@pytest.fixture(scope="module")
def features(image_sets) -> dict[str, np.ndarray]:
    extractor = FrozenFeatures()
    return {name: extractor(images).numpy() for name, images in zip(("real", "other", "degraded"), image_sets,
                                                                      strict=True)}


def _torchmetrics_fd(real: torch.Tensor, generated: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=FrozenFeatures())
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


@pytest.mark.parametrize("generated", ["other", "degraded"])
def test_frechet_distance_equals_torchmetrics(image_sets, features, generated):
    real, other, degraded = image_sets
    theirs = _torchmetrics_fd(real, {"other": other, "degraded": degraded}[generated])
    ours = frechet_distance_from_features(features["real"], features[generated])
    assert ours == pytest.approx(theirs, rel=1e-3)
    print(f"\nFD vs {generated}: gmpipe {ours:.6g}, torchmetrics {theirs:.6g}, relative difference "
          f"{abs(ours - theirs) / theirs:.1e}")
    mu1, sigma1 = feature_statistics(features["real"])
    mu2, sigma2 = feature_statistics(features[generated])
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(theirs, rel=1e-3)
    assert theirs > 0


def test_kernel_distance_equals_torchmetrics(image_sets, features):
    real, _, degraded = image_sets
    # whole sets: one subset of all N rows is every permutation of them, so both sides estimate the same MMD^2
    with pytest.warns(UserWarning, match="save all extracted features"):
        metric = KernelInceptionDistance(feature=FrozenFeatures(), subsets=1, subset_size=N)
    metric.update(real, real=True)
    metric.update(degraded, real=False)
    theirs, _ = metric.compute()
    ours, spread = kernel_distance(features["real"], features["degraded"], n_subsets=1, subset_size=N)
    assert ours == pytest.approx(float(theirs), rel=1e-3) and spread == 0.0
    print(f"\nKID: gmpipe {ours:.6g}, torchmetrics {float(theirs):.6g}, relative difference "
          f"{abs(ours - float(theirs)) / abs(float(theirs)):.1e}")
    # and subset by subset, on the same random subsets
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows_real, rows_generated = rng.choice(N, 100, replace=False), rng.choice(N, 100, replace=False)
        x, y = features["real"][rows_real], features["degraded"][rows_generated]
        assert mmd2_unbiased(x, y) == pytest.approx(float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y))),
                                                    rel=1e-3)


def brute_force_precision_recall(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, eqs. 1-3, one pair at a time: a sample is inside a set's manifold when it lies
    within the k-NN radius (the k-th nearest other member) of at least one member."""

    def radii(points):
        return [sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)[k - 1]
                for i, p in enumerate(points)]

    def inside(sample, points, radius):
        return any(np.linalg.norm(sample - q) <= r for q, r in zip(points, radius, strict=True))

    real_radii, generated_radii = radii(real), radii(generated)
    precision = np.mean([inside(g, real, real_radii) for g in generated])
    recall = np.mean([inside(r, generated, generated_radii) for r in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equal_the_paper_definition_on_toy_sets(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(60, 4))
    toy_sets = {
        "same distribution": rng.normal(size=(50, 4)),
        "shifted": rng.normal(size=(50, 4)) + 1.5,
        "collapsed onto one mode": rng.normal(size=(50, 4)) * 0.1 + real[0],
        "wider": rng.normal(size=(50, 4)) * 3.0,
    }
    results = {}
    for name, generated in toy_sets.items():
        expected = brute_force_precision_recall(real, generated, k)
        results[name] = tuple(precision_recall(real, generated, k=k, batch_size=16))
        assert results[name] == pytest.approx(expected, abs=1e-12), name
    # what the measures are for: a collapsed generator is precise but covers little, a wider one the reverse
    assert results["collapsed onto one mode"][0] > results["collapsed onto one mode"][1]
    assert results["wider"][1] > results["wider"][0]


def test_psnr_and_ssim_equal_torchmetrics(image_sets):
    real, other, degraded = image_sets
    rgb = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(rgb, 3, stride=1, padding=1)
    for x, y in ((degraded, other), (real[:20], other[:20]), (blurred, rgb)):
        x01, y01 = (x + 1) / 2, (y + 1) / 2  # gmpipe scores [-1, 1] images on the [0, 1] scale
        psnr = peak_signal_noise_ratio(x01, y01, data_range=1.0, reduction="none", dim=(1, 2, 3))
        torch.testing.assert_close(psnr_per_image(x, y), psnr, rtol=1e-6, atol=0)
        # torchmetrics' scalar also averages border positions, where its window reads reflect-padded pixels;
        # gmpipe (as Wang et al.'s reference code and scikit-image) averages where the window fits in the image
        _, ssim_map = structural_similarity_index_measure(x01, y01, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                          data_range=1.0, reduction="none", return_full_image=True)
        inside = ssim_map[..., HALF_WINDOW:-HALF_WINDOW, HALF_WINDOW:-HALF_WINDOW].flatten(1).mean(1)
        torch.testing.assert_close(ssim_per_image(x, y), inside, rtol=1e-6, atol=1e-9)
