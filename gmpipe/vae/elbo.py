"""The evidence lower bound of the KL autoencoder (Kingma & Welling 2014, eq. 10).

    -ELBO(x) = E_q(z|x)[-log p(x | z)] + KL(q(z | x) || p(z)),   q(z | x) = N(mu, diag sigma^2),  p(z) = N(0, I)

The expectation is estimated with the single decoded sample x_hat = D(z), z ~ q(z | x).

Reduction, written once here: every term is a sum over one sample's dimensions (pixels for the likelihood,
latent entries for the KL) averaged over the batch. This is the scale of the ELBO itself, so ``kl_weight = 1``
is the plain VAE and small weights (1e-6 .. 1e-3, the Latent Diffusion autoencoders) give a beta-VAE that is
barely regularised; the pixel terms grow with C x H x W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)), summed over the latent dimensions, averaged over the batch.

    Closed form for diagonal Gaussians: KL = 0.5 * sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2).

    Args:
        mean, logvar: posterior parameters, (B, ...) each (e.g. (B, c, h, w) latents).
    Returns:
        scalar tensor.
    """
    per_entry = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return per_entry.flatten(1).sum(dim=1).mean()


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element error between images x and reconstructions x_hat, both (B, C, H, W) -> (B, C, H, W).

    kind "l1": |x - x_hat|;  kind "l2": (x - x_hat)^2.
    """
    if kind == "l1":
        return (x - x_hat).abs()
    if kind == "l2":
        return (x - x_hat).square()
    raise ValueError(f"unknown reconstruction loss kind {kind!r}; choose 'l1' or 'l2'")


def negative_log_likelihood(error: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x | z) up to constants, from per-element errors (B, ...) -> scalar (sum per sample, batch mean).

    With a learned scalar log-variance s (the Latent Diffusion autoencoder's "nll"):

        nll = sum_pixels (error / exp(s) + s)

    which is, up to constants, the Laplace likelihood with scale exp(s) for an L1 error and twice the Gaussian
    likelihood with variance exp(s) / 2 for an L2 error; s settles at the log of the mean error, so the decoder
    is no longer pushed harder on images it already reconstructs well. Without s the nll is the summed error.
    """
    if logvar is not None:
        error = error / logvar.exp() + logvar
    return error.flatten(1).sum(dim=1).mean()


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1", logvar: torch.Tensor | None = None
) -> torch.Tensor:
    """The ELBO's likelihood term for images x and reconstructions x_hat, (B, C, H, W) each -> scalar.

    ``negative_log_likelihood(reconstruction_error(x, x_hat, kind), logvar)``; see both for the equations.
    """
    return negative_log_likelihood(reconstruction_error(x, x_hat, kind), logvar)


@dataclass
class ELBOTerms:
    """The parts of one negative-ELBO evaluation, scalars that keep their graphs.

    ``loss`` = ``nll`` + kl_weight * ``kl``; ``reconstruction`` is the mean per-element pixel error (without the
    perceptual distance or the log-variance), comparable across image sizes and for logging only.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    reconstruction: torch.Tensor


class ELBOLoss(nn.Module):
    """Negative ELBO with a KL weight: loss = nll(x, x_hat) + kl_weight * KL(q(z | x) || N(0, I)).

    Args:
        kind: pixel error, "l1" or "l2".
        kl_weight: beta of the beta-VAE (1 is the true ELBO).
        learned_logvar: learn the scalar log-variance s of ``negative_log_likelihood``; the parameter
            ``logvar`` then belongs to this module and must be optimised with the autoencoder.
        initial_logvar: starting value of s.
    """

    def __init__(
        self,
        kind: str = "l1",
        kl_weight: float = 1.0,
        learned_logvar: bool = False,
        initial_logvar: float = 0.0,
    ) -> None:
        super().__init__()
        reconstruction_error(torch.zeros(1), torch.zeros(1), kind)  # reject an unknown kind now, not mid-run
        self.kind = kind
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.tensor(float(initial_logvar))) if learned_logvar else None

    def forward(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        posterior_mean: torch.Tensor,
        posterior_logvar: torch.Tensor,
        perceptual_distance: torch.Tensor | None = None,
    ) -> ELBOTerms:
        """Negative ELBO of images x (B, C, H, W) given reconstructions x_hat and the posterior (B, c, h, w).

        ``perceptual_distance`` (B,), already weighted, is added to every pixel's error before the likelihood,
        as in the Latent Diffusion autoencoder: its weight is then on the same per-pixel scale as the pixel
        error, and the learned log-variance divides both.
        """
        pixel_error = reconstruction_error(x, x_hat, self.kind)
        error = pixel_error
        if perceptual_distance is not None:
            error = error + perceptual_distance.view(-1, *([1] * (error.dim() - 1)))
        nll = negative_log_likelihood(error, self.logvar)
        kl = kl_divergence(posterior_mean, posterior_logvar)
        return ELBOTerms(loss=nll + self.kl_weight * kl, nll=nll, kl=kl, reconstruction=pixel_error.mean())
