"""The KL autoencoder's training objective: ELBO + perceptual + patch-GAN, as for the Latent Diffusion
autoencoders (Rombach et al. 2022, appendix on the autoencoder models; Esser et al. 2021, eq. 7 for the
adaptive GAN weight).

Generator (autoencoder) step, with s the optional learned log-variance and d_P the perceptual distance:

    nll     = sum_pixels ((e(x, x_hat) + w_P * d_P(x, x_hat)) / exp(s) + s)        (batch mean; see elbo.py)
    L_G     = nll + w_KL * KL(q(z | x) || N(0, I)) + disc_factor(step) * lambda * w_GAN * L_adv(D(x_hat))
    lambda  = ||grad_{G_L} nll|| / (||grad_{G_L} L_adv|| + 1e-4)                   (adaptive_weight)

Discriminator step: L_D = disc_factor(step) * (hinge or non-saturating loss of D(x), D(x_hat.detach())).

Before ``disc_start`` the generator step does not run the discriminator at all (the adversarial terms are 0),
and the discriminator loss is 0 times a real loss, so that ``backward()`` and an optimizer step still work;
a loop may instead skip the discriminator step while ``not loss.discriminator_active(step)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gmpipe.vae.elbo import ELBOLoss
from gmpipe.vae.gan import D_LOSSES, G_LOSSES, adaptive_weight_from_output, disc_factor
from gmpipe.vae.perceptual import PerceptualLoss


class AutoencoderLoss(nn.Module):
    """Both losses of adversarial KL-autoencoder training, from plain settings.

    Args:
        rec_kind: pixel error, "l1" or "l2".
        kl_weight: w_KL; 1 is the plain ELBO, Latent Diffusion uses 1e-6 (terms are per-sample sums).
        perceptual_weight: w_P; 0 switches the perceptual loss off (and never builds its network).
        gan_weight: w_GAN, multiplied with the adaptive weight; 0 switches the adversarial loss off.
        gan_loss: "hinge" or "non_saturating", for both players.
        disc_start: first optimisation step with adversarial terms.
        learned_logvar: learn the scalar log-variance s; ``logvar`` is then a parameter of this module that
            the autoencoder's optimizer must include (``[p for p in loss.parameters() if p.requires_grad]``;
            the perceptual network's parameters are frozen).
        perceptual_loss: the perceptual distance to use; default ``PerceptualLoss()`` (EfficientNet-Lite0).
    """

    def __init__(
        self,
        rec_kind: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        gan_weight: float = 0.5,
        gan_loss: str = "hinge",
        disc_start: int = 0,
        learned_logvar: bool = False,
        perceptual_loss: PerceptualLoss | None = None,
    ) -> None:
        super().__init__()
        if gan_loss not in D_LOSSES:
            raise ValueError(f"unknown gan_loss {gan_loss!r}; choose one of {sorted(D_LOSSES)}")
        self.elbo = ELBOLoss(rec_kind, kl_weight, learned_logvar)
        self.perceptual_weight = perceptual_weight
        self.perceptual = None
        if perceptual_weight > 0:
            self.perceptual = perceptual_loss if perceptual_loss is not None else PerceptualLoss()
        self.gan_weight = gan_weight
        self.gan_loss = gan_loss
        self.disc_start = disc_start

    def discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at ``step``."""
        return self.gan_weight > 0 and disc_factor(step, self.disc_start) > 0

    def generator_loss(
        self,
        x: torch.Tensor,
        posterior_mean: torch.Tensor,
        posterior_logvar: torch.Tensor,
        x_hat: torch.Tensor,
        discriminator: nn.Module,
        step: int,
        last_layer: torch.Tensor | None = None,
        gradient_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_G for images x (B, C, H, W), posterior parameters (B, c, h, w) and reconstructions x_hat.

        ``last_layer`` is the decoder weight for the adaptive weight (``decoder_last_layer(vae)``); None uses
        lambda = 1 (a fixed ``gan_weight``). Without gradients (``torch.no_grad()`` evaluation) lambda cannot be
        measured and is 0, so the total is then the non-adversarial part. Without ``last_layer``,
        back-propagating L_G also leaves gradients on the discriminator's parameters: zero them before the
        discriminator step. With several data-parallel processes, ``gradient_mean`` averages a tensor over them, so
        that lambda is the global batch's (see ``adaptive_weight``).

        Returns:
            the scalar loss and detached terms "total", "nll", "kl", "reconstruction" (mean per-pixel error),
            "perceptual" (mean distance, unweighted), "gan" (unweighted L_adv), "adaptive_weight",
            "disc_factor", and "logvar" when it is learned. The keys are the same at every step.
        """
        perceptual_distance = None
        perceptual = x.new_zeros(())
        if self.perceptual is not None:
            distances = self.perceptual.distance(x, x_hat)
            perceptual = distances.mean()
            perceptual_distance = self.perceptual_weight * distances
        elbo = self.elbo(x, x_hat, posterior_mean, posterior_logvar, perceptual_distance)

        factor = disc_factor(step, self.disc_start)
        gan = x.new_zeros(())
        weight = x.new_zeros(())
        total = elbo.loss
        if self.discriminator_active(step):
            gan = G_LOSSES[self.gan_loss](discriminator(x_hat))
            if not torch.is_grad_enabled():
                weight = x.new_zeros(())
                total = total + factor * weight * self.gan_weight * gan
            elif last_layer is None:
                weight = x.new_ones(())
                total = total + factor * weight * self.gan_weight * gan
            else:
                total, weight = self._adaptive_total(elbo, gan, x_hat, factor, last_layer, gradient_mean)

        terms = {
            "total": total,
            "nll": elbo.nll,
            "kl": elbo.kl,
            "reconstruction": elbo.reconstruction,
            "perceptual": perceptual,
            "gan": gan,
            "adaptive_weight": weight,
            "disc_factor": x.new_tensor(factor),
        }
        if self.elbo.logvar is not None:
            terms["logvar"] = self.elbo.logvar
        return total, {name: value.detach().clone() for name, value in terms.items()}

    def _adaptive_total(self, elbo, gan, x_hat, factor, last_layer, gradient_mean):
        """L_G with the adaptive weight, back-propagating the perceptual network and the discriminator once.

        The nll and L_adv are each back-propagated to x_hat once; their output gradients give lambda through the
        last layer alone (``adaptive_weight_from_output``) and then stand in for both losses in the update: the
        returned loss has L_G's value and the gradient of

            <x_hat, g_nll + c g_adv> + w_KL KL (+ <s, d nll / d s> with a learned log-variance)

        with c = disc_factor * lambda * w_GAN and g the output gradients (constants),

        which is grad L_G with respect to every trained parameter (the discriminator's excepted: L_G leaves it
        no gradient this way). Computing lambda from the losses themselves, then back-propagating L_G, would run
        both networks' backward twice.
        """
        learned = [self.elbo.logvar] if self.elbo.logvar is not None else []
        nll_grads = torch.autograd.grad(elbo.nll, [x_hat, *learned], retain_graph=True)
        (gan_grad,) = torch.autograd.grad(gan, x_hat, retain_graph=True)
        weight = adaptive_weight_from_output(nll_grads[0], gan_grad, x_hat, last_layer, gradient_mean=gradient_mean)
        push = nll_grads[0] + (factor * self.gan_weight) * weight * gan_grad
        surrogate = (x_hat * push).sum() + self.elbo.kl_weight * elbo.kl
        for parameter, grad in zip(learned, nll_grads[1:], strict=True):
            surrogate = surrogate + (parameter * grad).sum()
        value = (elbo.loss + factor * weight * self.gan_weight * gan).detach()
        return surrogate + (value - surrogate.detach()), weight

    def discriminator_loss(
        self, x: torch.Tensor, x_hat_detached: torch.Tensor, discriminator: nn.Module, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_D for real images x and reconstructions x_hat, (B, C, H, W) each; both are detached here too.

        Returns:
            the scalar loss (0 times the loss before ``disc_start`` or with ``gan_weight`` 0) and detached
            terms "discriminator" (unscaled L_D), "logits_real", "logits_fake" (mean logits), "disc_factor".
        """
        logits_real = discriminator(x.detach())
        logits_fake = discriminator(x_hat_detached.detach())
        loss = D_LOSSES[self.gan_loss](logits_real, logits_fake)
        factor = 1.0 if self.discriminator_active(step) else 0.0
        terms = {
            "discriminator": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "disc_factor": x.new_tensor(factor),
        }
        return factor * loss, terms
