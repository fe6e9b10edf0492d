import math

import pytest
import torch

from gmpipe.vae.elbo import (
    ELBOLoss,
    kl_divergence,
    negative_log_likelihood,
    reconstruction_error,
    reconstruction_loss,
)


def test_kl_of_standard_normal_posterior_is_zero():
    zeros = torch.zeros(3, 4, 2, 2)
    assert kl_divergence(zeros, zeros).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_grows_as_mean_moves_away():
    logvar = torch.zeros(2, 4, 2, 2)
    values = [kl_divergence(torch.full_like(logvar, m), logvar).item() for m in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    # 0.5 * mu^2 per latent entry, 16 entries per sample
    assert values[-1] == pytest.approx(0.5 * 4.0 * 16)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_kl_grows_as_variance_moves_away_from_one(direction):
    mean = torch.zeros(2, 8)
    values = [kl_divergence(mean, torch.full_like(mean, direction * s)).item() for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_kl_matches_monte_carlo_and_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, generator=generator)
    logvar = 0.5 * torch.randn(2, 3, generator=generator)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros(()), torch.ones(()))

    z = mean + (0.5 * logvar).exp() * torch.randn(100_000, 2, 3, generator=generator)
    log_ratio = posterior.log_prob(z) - prior.log_prob(z)  # (N, B, D)
    monte_carlo = log_ratio.sum(dim=2).mean(dim=0).mean()  # sum over dims, mean over samples and batch

    closed_form = kl_divergence(mean, logvar)
    reference = torch.distributions.kl_divergence(posterior, prior).sum(dim=1).mean()
    assert closed_form.item() == pytest.approx(reference.item(), rel=1e-5)
    assert closed_form.item() == pytest.approx(monte_carlo.item(), abs=0.02)


def test_reconstruction_loss_sums_per_sample_and_averages_over_batch():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, 0.5, 0.5, 0.5]).view(2, 1, 2, 2)
    # sample sums: L1 4 and 2, L2 6 and 1
    assert reconstruction_loss(x, x_hat, "l1").item() == pytest.approx(3.0)
    assert reconstruction_loss(x, x_hat, "l2").item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_error(x, x_hat, "huber")


def test_learned_logvar_likelihood_and_its_optimum():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=generator)
    x_hat = torch.randn(2, 1, 4, 4, generator=generator)
    error = (x - x_hat).abs()
    s = torch.tensor(0.3)
    expected = (error / math.exp(0.3) + 0.3).sum(dim=(1, 2, 3)).mean()
    assert reconstruction_loss(x, x_hat, "l1", s).item() == pytest.approx(expected.item(), rel=1e-6)

    # d/ds sum(e / exp(s) + s) = 0 at s = log(mean e): the variance tracks the error
    optimum = error.mean().log().requires_grad_(True)
    negative_log_likelihood(error, optimum).backward()
    assert optimum.grad.item() == pytest.approx(0.0, abs=1e-4)


def test_elbo_loss_composition():
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 4, 4, generator=generator) * 2 - 1
    x_hat = torch.rand(2, 1, 4, 4, generator=generator) * 2 - 1
    mean = torch.randn(2, 2, 2, 2, generator=generator)
    logvar = torch.randn(2, 2, 2, 2, generator=generator)
    elbo = ELBOLoss("l2", kl_weight=0.1)
    terms = elbo(x, x_hat, mean, logvar)
    assert terms.nll.item() == pytest.approx(reconstruction_loss(x, x_hat, "l2").item())
    assert terms.loss.item() == pytest.approx(terms.nll.item() + 0.1 * kl_divergence(mean, logvar).item())
    assert terms.reconstruction.item() == pytest.approx((x - x_hat).square().mean().item())

    # a per-sample perceptual distance counts once per pixel (16 pixels here)
    distance = torch.tensor([0.5, 1.5])
    with_distance = elbo(x, x_hat, mean, logvar, perceptual_distance=distance)
    assert with_distance.nll.item() == pytest.approx(terms.nll.item() + 16 * distance.mean().item(), rel=1e-6)


def test_learned_logvar_is_a_trainable_parameter():
    elbo = ELBOLoss(learned_logvar=True, initial_logvar=0.5)
    assert [name for name, _ in elbo.named_parameters()] == ["logvar"]
    x, x_hat = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    terms = elbo(x, x_hat, torch.zeros(1, 2), torch.zeros(1, 2))
    terms.loss.backward()
    assert elbo.logvar.grad is not None
    assert ELBOLoss().logvar is None
