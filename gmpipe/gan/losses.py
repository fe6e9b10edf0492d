"""Adversarial losses of a generator G and a discriminator D that outputs logits l = D(.), and the R1 penalty.

One set, shared by the standalone latent GAN (``gmpipe.gan``) and the autoencoder's patch discriminator
(``gmpipe.vae.gan``). D(x) = sigmoid(l) is the probability that x is real; x are data, G(z) generated samples.
Logits may have any shape (a PatchGAN gives (B, 1, h, w), the latent GAN (B,)); every loss is a mean over all
of them.

The game (Goodfellow et al. 2014, eq. 1):

    min_G max_D  V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]

Discriminator losses are written as the mean of the real and the fake term (a factor 1/2: L_D = -V / 2 for the
cross-entropy form), so that the hinge and the cross-entropy losses start on similar scales. The factor only
rescales D's gradient; Adam is invariant to it.

Three selectable pairs (``AdversarialLoss``, registered by kind in ``gmpipe.registry.GAN_LOSSES``, so params name
them without importing torch), also as ``D_LOSSES[kind]`` and ``G_LOSSES[kind]`` with kind in ``LOSS_KINDS``:

    kind              L_D                                              L_G
    "minimax"         1/2 (E[-log D(x)] + E[-log(1 - D(G(z)))])        E[log(1 - D(G(z)))]
    "non_saturating"  same as minimax                                  E[-log D(G(z))]
    "hinge"           1/2 (E[max(0, 1 - l_real)] + E[max(0, 1 + l_fake)])   -E[l_fake]

With l = logit, the derivative of L_G per fake logit (times the number of logits N) is -sigmoid(l) for minimax,
-sigmoid(-l) = -(1 - D(G(z))) for non-saturating and -1 for hinge: early in training D rejects G(z) confidently
(l << 0) and the minimax gradient vanishes while the non-saturating one is close to -1 (the seed's reason for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017; Miyato et al. 2018):

    L_D = 1/2 (E[max(0, 1 - l_real)] + E[max(0, 1 + l_fake)]),   l_real = logits of D on x, l_fake on G(z).
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Cross-entropy discriminator loss (Goodfellow et al. 2014, eq. 1, the D side; the same for the minimax and
    the non-saturating game):

        L_D = 1/2 (E[-log D(x)] + E[-log(1 - D(G(z)))]) = 1/2 (E[softplus(-l_real)] + E[softplus(l_fake)])

    since -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l) (numerically stable form).
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def minimax_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Minimax generator loss (Goodfellow et al. 2014, eq. 1, the G side): G minimizes

        L_G = E[log(1 - D(G(z)))] = -E[softplus(l_fake)]

    Its gradient -sigmoid(l_fake) / N vanishes where D confidently rejects G(z) (l_fake << 0)."""
    return -F.softplus(logits_fake).mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014, section 3): G maximizes log D(G(z)), i.e. minimizes
    L_G = E[-log D(G(z))] = E[softplus(-l_fake)], which keeps strong gradients while D still rejects G(z)."""
    return F.softplus(-logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge discriminator loss (Miyato et al. 2018): L_G = -E[l_fake]."""
    return -logits_fake.mean()


@dataclass(frozen=True)
class AdversarialLoss:
    """One selectable game: the discriminator's loss L_D(l_real, l_fake) and the generator's L_G(l_fake)."""

    discriminator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator: Callable[[torch.Tensor], torch.Tensor]


MINIMAX = AdversarialLoss(non_saturating_d_loss, minimax_g_loss)
NON_SATURATING = AdversarialLoss(non_saturating_d_loss, non_saturating_g_loss)
HINGE = AdversarialLoss(hinge_d_loss, hinge_g_loss)

_GAMES = {"minimax": MINIMAX, "non_saturating": NON_SATURATING, "hinge": HINGE}
LOSS_KINDS = tuple(_GAMES)
D_LOSSES = {kind: game.discriminator for kind, game in _GAMES.items()}
G_LOSSES = {kind: game.generator for kind, game in _GAMES.items()}


def check_loss_kind(kind: str) -> str:
    """``kind`` if it names a loss pair, else a ValueError listing the choices."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    return kind


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """R1 gradient penalty on real data (Mescheder et al. 2018, eq. 9):

        R1 = gamma / 2 * E_x[ || grad_x D(x) ||^2 ]

    where D(x) is the logit. ``real`` (B, ...) must require gradients and ``logits_real`` must be computed from
    it (the same forward pass as the adversarial loss); logits of shape (B,) or (B, ...) are summed per sample
    first (a patch discriminator's per-sample logit is the sum of its patches). The gradient is taken with
    ``create_graph=True``, so back-propagating R1 reaches D's parameters.

    Returns:
        scalar tensor: gamma / 2 times the batch mean of the per-sample squared gradient norm.
    """
    if not real.requires_grad:
        raise ValueError("r1_penalty needs real.requires_grad_(True) before D is applied to it")
    (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    squared_norm = grad.square().flatten(start_dim=1).sum(dim=1)  # (B,)
    return 0.5 * gamma * squared_norm.mean()
