"""Adversarial losses for the autoencoder's decoder G and a discriminator D that outputs logits l = D(.).

D(x) = sigmoid(l) is the probability that x is real. x are data images, G(z) = x_hat reconstructions. Logits
may have any shape (a PatchGAN gives (B, 1, h, w)); every loss is a mean over all of them.

Discriminator losses take the mean of the real and the fake term (a factor 1/2), so that the hinge and the
non-saturating loss start on similar scales.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017; Miyato et al. 2018):

    L_D = 1/2 (E[max(0, 1 - l_real)] + E[max(0, 1 + l_fake)]),   l_real = logits of D on x, l_fake on G(z).
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Cross-entropy discriminator loss (Goodfellow et al. 2014, eq. 1, the D side):

        L_D = 1/2 (E[-log D(x)] + E[-log(1 - D(G(z)))]) = 1/2 (E[softplus(-l_real)] + E[softplus(l_fake)])

    since -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l) (numerically stable form).
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014, section 3): L_G = E[-log D(G(z))]
    = E[softplus(-l_fake)], which keeps strong gradients while D still rejects G(z)."""
    return F.softplus(-logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge discriminator loss (Miyato et al. 2018): L_G = -E[l_fake]."""
    return -logits_fake.mean()


D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


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
    if gradient_mean is not None:
        rec_grad, gan_grad = gradient_mean(rec_grad), gradient_mean(gan_grad)
    weight = rec_grad.norm() / (gan_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, disc_start: int) -> float:
    """1.0 from optimisation step ``disc_start`` on, else 0.0: the adversarial terms are switched on only
    once reconstructions are reasonable, so D does not win early on blurry noise."""
    return 1.0 if step >= disc_start else 0.0
