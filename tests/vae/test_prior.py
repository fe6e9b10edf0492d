"""The VAE as a generator: the discretized Gaussian and the negative ELBO in bits per dimension against hand
computations, and prior samples that depend only on their own seed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mpmath
import numpy as np
import pytest
import torch

from gmpipe.generator import load_generator
from gmpipe.nn.autoencoder import build_autoencoder_preset
from gmpipe.vae.density import PriorFile, discretized_gaussian_log_prob, fit_decoder_std
from gmpipe.vae.prior import VAEPrior, negative_elbo


def _hand_log_prob(levels: np.ndarray, mean: np.ndarray, std: float) -> float:
    """log P(levels) under a Gaussian discretized to 256 levels, pixel by pixel, with 50-digit arithmetic (mpmath,
    which torch installs through sympy), so far tails are exact too."""
    mpmath.mp.dps = 50
    total = mpmath.mpf(0)
    for k, mu in zip(levels.ravel(), mean.ravel(), strict=True):
        x = mpmath.mpf(int(k)) / mpmath.mpf("127.5") - 1
        upper = mpmath.inf if k == 255 else (x + mpmath.mpf(1) / 255 - float(mu)) / std
        lower = -mpmath.inf if k == 0 else (x - mpmath.mpf(1) / 255 - float(mu)) / std
        # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): the form whose terms do not both round to 1
        mass = mpmath.ncdf(-lower) - mpmath.ncdf(-upper) if lower > 0 else mpmath.ncdf(upper) - mpmath.ncdf(lower)
        total += mpmath.log(mass)
    return float(total)


def test_discretized_gaussian_matches_exact_arithmetic_including_edges_and_far_tails():
    levels = np.array([[[[0, 255], [128, 3]]], [[[7, 250], [64, 200]]]], dtype=np.uint8)  # (2, 1, 2, 2)
    mean = torch.tensor([[[[-0.9, 0.95], [0.3, -1.2]]], [[[0.2, -0.4], [0.0, 0.55]]]], dtype=torch.float64)
    for std in (0.05, 0.3, 1.0):
        ours = discretized_gaussian_log_prob(torch.from_numpy(levels), mean, std)
        hand = [_hand_log_prob(levels[i], mean[i].numpy(), std) for i in range(2)]
        np.testing.assert_allclose(ours.numpy(), hand, rtol=1e-9)
    # Far in the tail, where 1 - cdf rounds to 0 in float64: finite and exact.
    far, mean = np.array([[[[250]], [[5]]]], dtype=np.uint8), torch.tensor([[[[-0.9]], [[0.9]]]], dtype=torch.float64)
    ours = discretized_gaussian_log_prob(torch.from_numpy(far), mean, 0.02)
    assert ours.item() == pytest.approx(_hand_log_prob(far[0], mean[0].numpy(), 0.02), rel=1e-9)
    # The 256 probabilities of one pixel sum to 1.
    every_level = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    total = discretized_gaussian_log_prob(every_level, torch.full((256, 1, 1, 1), 0.1), 0.2).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)


class ToyVAE:
    """A linear 'autoencoder' small enough to compute its ELBO by hand: images (B, 1, 2, 2) in [-1, 1]; the posterior
    of pixel j is N(0.5 x_j, exp(logvar_j)) with a fixed logvar; the decoder maps z to 0.8 z + 0.1."""

    logvar = torch.tensor([-1.0, -0.5, 0.0, -2.0]).view(1, 1, 2, 2)

    def encode(self, x):
        mean = 0.5 * x
        logvar = self.logvar.expand_as(x)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=logvar, std=(0.5 * logvar).exp()))

    def decode(self, z):
        return SimpleNamespace(sample=0.8 * z + 0.1)


def _toy_by_hand(image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The toy's pixels x, posterior mean and its decoded posterior sample, with eps from the image's own seed."""
    x = image.ravel() / 127.5 - 1
    eps = torch.randn(4, generator=torch.Generator().manual_seed(seed)).numpy()
    mean = 0.5 * x
    z = mean + np.exp(0.5 * ToyVAE.logvar.numpy().ravel()) * eps
    return x, mean, np.clip(0.8 * z + 0.1, -1, 1)


def test_negative_elbo_in_bits_per_dim_matches_a_hand_computation():
    images = np.array([[[[0, 90], [200, 255]]], [[[31, 128], [129, 17]]], [[[255, 255], [0, 60]]]], dtype=np.uint8)
    seeds, std = [11, 12, 13], 0.25
    result = negative_elbo(ToyVAE(), images, seeds, std, batch_size=2)

    logvar = ToyVAE.logvar.numpy().ravel()
    expected, squared_errors = [], []
    for image, seed in zip(images, seeds, strict=True):
        x, mean, decoded = _toy_by_hand(image, seed)
        reconstruction = -_hand_log_prob(image.ravel(), decoded, std)
        kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar)
        expected.append((reconstruction + kl) / (4 * math.log(2)))  # nats -> bits per dimension
        squared_errors.append((decoded - x) ** 2)
    assert result.bits == pytest.approx(np.mean(expected), rel=1e-6)
    assert result.standard_error == pytest.approx(np.std(expected, ddof=1) / math.sqrt(3), rel=1e-5)
    assert result.n == 3 and result.unit == "bits/dim" and result.kind == "upper bound"
    parts = result.parts
    assert parts["reconstruction_bits_per_dim"] + parts["kl_bits_per_dim"] == pytest.approx(result.bits)
    # The fitted decoder scale is the root mean squared error of the decoded posterior samples.
    assert fit_decoder_std(ToyVAE(), images, seeds, batch_size=2) == pytest.approx(math.sqrt(np.mean(squared_errors)))


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> VAEPrior:
    torch.manual_seed(0)
    vae = build_autoencoder_preset("tiny", 1).eval()  # f = 2: 8x8 images, 4x4x4 latents
    return VAEPrior(vae, PriorFile(image_shape=[1, 8, 8], latent_shape=[4, 4, 4], decoder_std=0.1,
                                   decoder_std_fitted_on="val", class_names=["a", "b"]))


def test_vae_prior_samples_depend_only_on_their_seed(prior, tmp_path):
    images, nfe = prior.generate(None, [3, 4, 5], batch_size=2)
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.uint8 and nfe == 1
    alone, _ = prior.generate([None], [5], batch_size=1)
    np.testing.assert_array_equal(alone[0], images[2])  # neither the batch nor the neighbours matter
    again, _ = prior.generate(None, [3, 4, 5], batch_size=3)
    np.testing.assert_array_equal(again, images)
    assert not np.array_equal(images[0], images[1])
    # Temperature 0 decodes the prior's mean, z = 0, for every seed.
    cold, _ = prior.generate(None, [1, 2], temperature=0.0)
    np.testing.assert_array_equal(cold[0], cold[1])
    with pytest.raises(ValueError, match="temperature"):
        prior.generate(None, [1], temperature=-1.0)

    prior.save(tmp_path / "vae", "train_vae")
    loaded = load_generator(tmp_path / "vae")  # found by its family.json, as evaluate and `gmpipe sample` find it
    assert isinstance(loaded, VAEPrior) and not loaded.conditioning.conditional
    np.testing.assert_array_equal(loaded.generate(None, [3, 4, 5])[0], images)
    first = loaded.likelihood(images, None, [7, 8, 9])
    second = loaded.likelihood(images[1:], None, [8, 9], batch_size=1)
    assert first.parts["decoder_std"] == 0.1 and math.isfinite(first.bits)
    per_item = 3 * first.bits - 2 * second.bits  # item 0's own bits: the others do not change with the batch
    assert per_item == pytest.approx(negative_elbo(loaded.autoencoder, images[:1], [7], 0.1).bits, rel=1e-6)
