"""Toys with closed-form teachers for the distillation tests, and tiny trainable students.

Mixture of Gaussians x ~ sum_k pi_k N(mu_k, diag(std_k^2)): under x_t = a x + b z each component gives
x_t | k ~ N(a mu_k, v_k), v_k = a^2 std_k^2 + b^2 (per dimension), so with responsibilities
r_k(x_t) = pi_k N(x_t; a mu_k, v_k) / sum_j (...)

    E[x | x_t] = sum_k r_k (mu_k + a std_k^2 (x_t - a mu_k) / v_k),   E[z | x_t] = sum_k r_k b (x_t - a mu_k) / v_k,

and the exact prediction in any target is objective.from_data_and_noise(E[x | x_t], E[z | x_t], t).
One component is the Gaussian toy (E[x | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gmpipe.diffusion import Objective
from gmpipe.diffusion.times import expand_like

DTYPE = torch.float64


def mixture_posterior(
    means: Tensor, stds: Tensor, log_weights: Tensor, a: Tensor, b: Tensor, x_t: Tensor
) -> tuple[Tensor, Tensor]:
    """(E[x | x_t], E[z | x_t]), each (B, D), for components means (B or 1, K, D), stds (B or 1, K, D),
    log_weights (B or 1, K); a, b (B, 1); x_t (B, D)."""
    a, b = a[:, None], b[:, None]  # (B, 1, 1)
    offset = x_t[:, None] - a * means  # (B, K, D)
    variance = a.square() * stds.square() + b.square()
    log_likelihood = -0.5 * (offset.square() / variance + variance.log()).sum(-1)  # (B, K)
    responsibility = torch.softmax(log_weights + log_likelihood, dim=-1)[..., None]  # (B, K, 1)
    x_hat = (responsibility * (means + a * stds.square() * offset / variance)).sum(1)
    z_hat = (responsibility * (b * offset / variance)).sum(1)
    return x_hat, z_hat


class GaussianMixture:
    """Data from sum_k weights_k N(means_k, diag(stds_k^2)); means, stds (K, D), weights (K,)."""

    def __init__(self, means, stds, weights) -> None:
        self.means = torch.as_tensor(means, dtype=DTYPE)
        self.stds = torch.as_tensor(stds, dtype=DTYPE).expand_as(self.means)
        self.weights = torch.as_tensor(weights, dtype=DTYPE)
        self.dim = self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def std(self) -> Tensor:
        second_moment = (self.weights[:, None] * (self.stds.square() + self.means.square())).sum(0)
        return (second_moment - self.mean.square()).sqrt()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return self.means[component] + self.stds[component] * noise

    def model_fn(self, objective: Objective) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact prediction (x_t, t) -> c E[x | x_t] + d E[z | x_t] in objective.target."""

        def exact_prediction(x_t: Tensor, t: Tensor) -> Tensor:
            a = expand_like(objective.schedule.a(t), x_t)
            b = expand_like(objective.schedule.b(t), x_t)
            x_hat, z_hat = mixture_posterior(self.means[None], self.stds[None], self.weights.log()[None], a, b, x_t)
            return objective.from_data_and_noise(x_hat, z_hat, t)

        return exact_prediction


class ClassConditionalGaussians:
    """Class k: x ~ N(means_k, std^2 I) in 2-D. cond (B, 3) = (class mean, 1); the null cond is (0, 0, 0),
    for which the exact model is the unconditional one (the equal-weight mixture of the classes)."""

    def __init__(self, means, std: float) -> None:
        self.means = torch.as_tensor(means, dtype=DTYPE)
        self.std = std
        self.mixture = GaussianMixture(self.means, torch.full_like(self.means, std), torch.ones(len(self.means)))
        self.null_cond = torch.zeros(1, 3, dtype=DTYPE)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x (n, 2), cond (n, 3))."""
        label = torch.randint(len(self.means), (n,), generator=generator)
        mean = self.means[label]
        x = mean + self.std * torch.randn(n, 2, generator=generator, dtype=DTYPE)
        return x, torch.cat([mean, torch.ones(n, 1, dtype=DTYPE)], dim=1)

    def denoiser_fn(self, objective: Objective) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """Exact (x_t, t, cond) -> prediction: the class posterior, or the mixture posterior for null rows."""
        unconditional = self.mixture.model_fn(objective)

        def exact_prediction(x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            a = expand_like(objective.schedule.a(t), x_t)
            b = expand_like(objective.schedule.b(t), x_t)
            stds = torch.full_like(cond[:, None, :2], self.std)
            x_hat, z_hat = mixture_posterior(cond[:, None, :2], stds, torch.zeros_like(cond[:, :1]), a, b, x_t)
            conditional = objective.from_data_and_noise(x_hat, z_hat, t)
            return torch.where(cond[:, 2:] > 0, conditional, unconditional(x_t, t))

        return exact_prediction


def time_features(t: Tensor) -> Tensor:
    """(B,) -> (B, 7): t and sin / cos(k pi t), k = 1..3."""
    angles = t[:, None] * math.pi * torch.arange(1, 4, dtype=t.dtype)
    return torch.cat([t[:, None], angles.sin(), angles.cos()], dim=1)


class AffineStudent(nn.Module):
    """prediction = A(t) x_t + B(t) per dimension, (A, B) linear in time_features(t): exact for Gaussian data,
    where every posterior mean and every DDIM step is affine in x_t."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.coefficients = nn.Linear(7, 2 * dim, dtype=DTYPE)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        scale, offset = self.coefficients(time_features(t)).chunk(2, dim=1)
        return scale * x_t + offset


class MLPStudent(nn.Module):
    """prediction = MLP(x_t, cond, time_features(t)), two hidden SiLU layers."""

    def __init__(self, dim: int, cond_dim: int = 0, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + cond_dim + 7, width, dtype=DTYPE), nn.SiLU(),
            nn.Linear(width, width, dtype=DTYPE), nn.SiLU(),
            nn.Linear(width, dim, dtype=DTYPE),
        )

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        inputs = [x_t, time_features(t)] if cond is None else [x_t, cond, time_features(t)]
        return self.net(torch.cat(inputs, dim=1))


def fit(student: nn.Module, batch_loss: Callable[[], Tensor], steps: int, lr: float) -> float:
    """Adam on batch_loss() (a fresh batch each call) for `steps` steps, cosine-decayed lr; the last loss."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return loss.item()
