"""What the autoencoder adds to the shared adversarial losses: the adaptive GAN weight and the switch-on step.

The losses themselves (hinge, cross-entropy / non-saturating, minimax, R1) live in :mod:`gmpipe.gan.losses`,
one set shared with the standalone latent GAN; they are re-exported here under the names the autoencoder's
objective (``gmpipe.vae.autoencoder_loss``) uses. For the autoencoder, G(z) = x_hat are reconstructions and D is
the patch discriminator (logits (B, 1, h, w)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gmpipe.gan.losses import (
    D_LOSSES,
    G_LOSSES,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)

__all__ = [
    "D_LOSSES",
    "G_LOSSES",
    "adaptive_weight",
    "adaptive_weight_from_output",
    "disc_factor",
    "hinge_d_loss",
    "hinge_g_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
]


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    eps: float = 1e-4,
    max_weight: float = 1e4,
    gradient_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Adaptive weight of the GAN term (Esser et al. 2021, "Taming Transformers", eq. 7):

        lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + eps),   clamped to [0, max_weight]

    where G_L is the decoder's last layer, so that the adversarial gradient reaching the decoder has the size
    of the reconstruction gradient whatever the two losses' scales. Both gradients are taken with
    ``retain_graph=True`` (the caller still back-propagates through both losses) and lambda is detached:
    it is a weight, not something to optimise.

    With data-parallel training each rank holds the losses of its share of the batch: ``gradient_mean`` (the mean
    of a tensor over the ranks, an all-reduce) turns both gradients into those of the global batch's mean losses,
    so every rank uses the same lambda, the one a single process would compute on the whole batch.

    Args:
        rec_loss, gan_loss: scalar losses whose graphs reach ``last_layer``.
        last_layer: a weight tensor of the decoder (e.g. ``decoder_last_layer(vae)``).
        gradient_mean: None with one process.
    Returns:
        scalar tensor lambda, detached.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return _gradient_ratio(rec_grad, gan_grad, eps, max_weight, gradient_mean)


def adaptive_weight_from_output(
    rec_output_grad: torch.Tensor,
    gan_output_grad: torch.Tensor,
    output: torch.Tensor,
    last_layer: torch.Tensor,
    eps: float = 1e-4,
    max_weight: float = 1e4,
    gradient_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``adaptive_weight`` from the two losses' gradients with respect to the decoder's output x_hat.

    grad_{G_L} L = (d x_hat / d G_L)^T grad_{x_hat} L, so with both output gradients in hand (each loss back-propagated
    once, to x_hat) the last layer's gradients cost only the last layer's own backward. A caller that also needs the
    output gradients for the update (``AutoencoderLoss``) thus runs the perceptual network's and the discriminator's
    backward once instead of twice.

    Args:
        rec_output_grad, gan_output_grad: grad_{x_hat} L_rec and grad_{x_hat} L_GAN, shaped like ``output``.
        output: x_hat, whose graph reaches ``last_layer`` (kept: ``retain_graph=True``).
    """
    (rec_grad,) = torch.autograd.grad(output, last_layer, grad_outputs=rec_output_grad, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(output, last_layer, grad_outputs=gan_output_grad, retain_graph=True)
    return _gradient_ratio(rec_grad, gan_grad, eps, max_weight, gradient_mean)


def _gradient_ratio(rec_grad, gan_grad, eps, max_weight, gradient_mean) -> torch.Tensor:
    if gradient_mean is not None:
        rec_grad, gan_grad = gradient_mean(rec_grad), gradient_mean(gan_grad)
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, disc_start: int) -> float:
    """1.0 from optimisation step ``disc_start`` on, else 0.0: the adversarial terms are switched on only
    once reconstructions are reasonable, so D does not win early on blurry noise."""
    return 1.0 if step >= disc_start else 0.0
