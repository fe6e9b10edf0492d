"""Both players of the latent GAN as losses for the shared training loop (``gmpipe.train.loop.LossStep``):
loss(batch, step, context, modules) -> (loss, {term: detached scalar}).

The loop runs the LossSteps in order on each micro-batch, each with the other modules frozen:

1. the generator step draws z ~ N(0, I) (from the global RNG, which the loop seeds), computes G(z, y) for the
   batch's labels y, minimizes L_G(D(G(z, y), y)) and leaves G(z, y).detach() in ``context["fake"]``;
2. the discriminator step minimizes L_D(D(x, y), D(G(z, y), y)) on the batch's real latents x and those fakes,
   plus the R1 penalty every ``r1_every`` steps ("lazy regularization", Karras et al. 2020, sec. 3.1: applied
   r1_every times as strongly, so its average strength does not depend on the interval).

Batches are (latents (B, c, h, w), labels (B,) int64 or None), as the latent stages' batch makers give them.
The loop keeps the EMA of the LossStep named by ``ema_of``: pass ``ema_of=GENERATOR``.
"""

from __future__ import annotations

import torch

from gmpipe.gan.discriminator import ProjectionDiscriminator
from gmpipe.gan.generator import ConditionalGenerator
from gmpipe.gan.losses import D_LOSSES, G_LOSSES, check_loss_kind, r1_penalty
from gmpipe.train.step import LossFn, LossStep

GENERATOR = "generator"
DISCRIMINATOR = "discriminator"


def generator_loss_fn(z_dim: int, kind: str = "non_saturating", *, generator: str = GENERATOR,
                      discriminator: str = DISCRIMINATOR) -> LossFn:
    """L_G of ``kind`` ("minimax", "non_saturating" or "hinge"; see ``gmpipe.gan.losses``) on fresh fakes
    G(z, y), z (B, z_dim).

    Terms: "loss" (L_G) and "logits_fake" (mean D logit on the fakes, before D's update)."""
    g_loss = G_LOSSES[check_loss_kind(kind)]

    def loss(batch, step, context, modules):
        real, labels = batch
        fake = modules[generator](torch.randn(real.shape[0], z_dim, device=real.device), labels)
        context["fake"] = fake.detach()
        logits_fake = modules[discriminator](fake, labels)
        value = g_loss(logits_fake)
        return value, {"loss": value.detach(), "logits_fake": logits_fake.detach().mean()}

    return loss


def discriminator_loss_fn(z_dim: int, kind: str = "non_saturating", *, r1_gamma: float = 0.0, r1_every: int = 1,
                          generator: str = GENERATOR, discriminator: str = DISCRIMINATOR) -> LossFn:
    """L_D of ``kind`` plus r1_every * R1 (gamma = ``r1_gamma``) on the steps divisible by ``r1_every``.

    The fakes are the generator step's ``context["fake"]``; without one (a loop running this step alone) they
    are drawn here without gradient. Terms, the same keys at every step: "loss" (L_D without R1), "r1" (the
    penalty applied at this step: r1_every * R1 on regularized steps, else 0, so its mean over a logging interval
    that is a multiple of r1_every estimates R1), "logits_real" and "logits_fake" (mean logits)."""
    d_loss = D_LOSSES[check_loss_kind(kind)]
    if r1_gamma < 0:
        raise ValueError(f"r1_gamma must be >= 0, got {r1_gamma}")
    if r1_every < 1:
        raise ValueError(f"r1_every must be >= 1, got {r1_every}")

    def loss(batch, step, context, modules):
        real, labels = batch
        fake = context.get("fake")
        if fake is None:
            with torch.no_grad():
                fake = modules[generator](torch.randn(real.shape[0], z_dim, device=real.device), labels)
        regularize = r1_gamma > 0 and step % r1_every == 0
        real = real.detach().requires_grad_(regularize)
        logits_real = modules[discriminator](real, labels)
        logits_fake = modules[discriminator](fake.detach(), labels)
        adversarial = d_loss(logits_real, logits_fake)
        penalty = r1_every * r1_penalty(logits_real, real, r1_gamma) if regularize else adversarial.new_zeros(())
        terms = {"loss": adversarial.detach(), "r1": penalty.detach(), "logits_real": logits_real.detach().mean(),
                 "logits_fake": logits_fake.detach().mean()}
        return adversarial + penalty, terms

    return loss


def gan_loss_steps(generator: ConditionalGenerator, discriminator: ProjectionDiscriminator,
                   kind: str = "non_saturating", *, r1_gamma: float = 0.0, r1_every: int = 1,
                   g_lr: float | None = None, d_lr: float | None = None) -> list[LossStep]:
    """The two LossSteps, generator first (its fakes feed the discriminator step), named ``GENERATOR`` and
    ``DISCRIMINATOR``; ``g_lr`` and ``d_lr`` override the loop's learning rate (None keeps it)."""
    return [
        LossStep(GENERATOR, generator, generator_loss_fn(generator.z_dim, kind), lr=g_lr),
        LossStep(DISCRIMINATOR, discriminator,
                 discriminator_loss_fn(generator.z_dim, kind, r1_gamma=r1_gamma, r1_every=r1_every), lr=d_lr),
    ]
