"""Perceptual path length of linear generators, where it has a closed form, and with the project's distance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmpipe.gan.path_length import path_endpoints, path_length_terms, perceptual_path_length
from gmpipe.vae.perceptual import PerceptualLoss

Z_DIM = 8


class LinearGenerator(nn.Module):
    """G(z, y) = a_y Q z as a (Z_DIM, 1, 1) latent, Q orthogonal: |G(u) - G(v)| = a_y |u - v| (float64)."""

    def __init__(self, scales: list[float]):
        super().__init__()
        self.z_dim, self.latent_shape = Z_DIM, (Z_DIM, 1, 1)
        seeded = torch.Generator().manual_seed(1)
        q, _ = torch.linalg.qr(torch.randn(Z_DIM, Z_DIM, dtype=torch.float64, generator=seeded))
        self.q = nn.Parameter(q)
        self.scales = torch.tensor(scales, dtype=torch.float64)

    def forward(self, z, labels=None):
        scale = self.scales[labels][:, None] if labels is not None else self.scales[0]
        return (scale * (z @ self.q.T)).view(-1, *self.latent_shape)


def squared_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).sum(dim=1)


def _closed_form(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """a^2 |slerp(t + eps) - slerp(t)|^2 / eps^2 with slerp = alpha(t) z0 + beta(t) z1, per pair."""
    cos = (z0 * z1).sum(1) / (z0.norm(dim=1) * z1.norm(dim=1))
    theta = torch.arccos(cos)

    def alpha(s):
        return torch.sin((1 - s) * theta) / torch.sin(theta)

    def beta(s):
        return torch.sin(s * theta) / torch.sin(theta)

    d_alpha, d_beta = alpha(t + eps) - alpha(t), beta(t + eps) - beta(t)
    squared = d_alpha**2 * z0.square().sum(1) + d_beta**2 * z1.square().sum(1) + 2 * d_alpha * d_beta * (z0 * z1).sum(1)
    return scale**2 * squared / eps**2


def test_equal_norm_pairs_give_the_chord_length_for_any_t():
    # |z0| = |z1| = r at angle theta: |slerp(t + eps) - slerp(t)| = 2 r sin(eps theta / 2) whatever t,
    # so the term is a^2 (2 r sin(eps theta / 2))^2 / eps^2 -> a^2 r^2 theta^2 as eps -> 0
    generator = LinearGenerator([1.5])
    e = torch.eye(Z_DIM, dtype=torch.float64)
    thetas = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    radii = torch.tensor([1.0, 2.0, 2.8], dtype=torch.float64)
    z0 = radii[:, None] * e[0]
    z1 = radii[:, None] * (torch.cos(thetas)[:, None] * e[0] + torch.sin(thetas)[:, None] * e[1])
    eps = 1e-4
    expected = 1.5**2 * (2 * radii * torch.sin(eps * thetas / 2)) ** 2 / eps**2
    for t in (0.0, 0.37, 0.9):
        terms = path_length_terms(generator, z0, z1, torch.full((3,), t), None, squared_l2, eps=eps)
        torch.testing.assert_close(terms, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(expected, 1.5**2 * radii**2 * thetas**2, rtol=1e-8, atol=0)


def test_seeded_estimate_matches_the_closed_form_per_pair_and_class():
    generator = LinearGenerator([1.0, 0.5, 2.0])
    seeds, labels = list(range(40)), torch.arange(40) % 3
    result = perceptual_path_length(generator, squared_l2, seeds, labels, eps=1e-4, batch_size=16)
    z0, z1, t = path_endpoints(seeds, Z_DIM)
    expected = _closed_form(z0, z1, t, generator.scales[labels], 1e-4)
    torch.testing.assert_close(result.values, expected, rtol=1e-6, atol=0)
    assert result.mean == pytest.approx(float(expected.mean()), rel=1e-6)
    summary = result.to_dict()
    assert summary["n"] == 40 and summary["eps"] == 1e-4 and summary["t_sampling"] == "full"
    assert summary["ppl_stderr"] == pytest.approx(float(expected.std()) / math.sqrt(40), rel=1e-5)


def test_terms_do_not_depend_on_batch_size_or_the_other_pairs():
    generator = LinearGenerator([1.0, 3.0])
    seeds, labels = [5, 6, 7, 8, 9], torch.tensor([0, 1, 1, 0, 1])
    whole = perceptual_path_length(generator, squared_l2, seeds, labels, batch_size=5).values
    torch.testing.assert_close(perceptual_path_length(generator, squared_l2, seeds, labels, batch_size=2).values,
                               whole, rtol=1e-12, atol=0)
    alone = perceptual_path_length(generator, squared_l2, [7], labels[2:3]).values
    torch.testing.assert_close(alone, whole[2:3], rtol=1e-12, atol=0)


def test_decode_is_applied_before_the_distance_and_endpoints_sampling():
    generator = LinearGenerator([1.0])
    plain = perceptual_path_length(generator, squared_l2, range(6))
    doubled = perceptual_path_length(generator, squared_l2, range(6), decode=lambda latents: 2 * latents)
    torch.testing.assert_close(doubled.values, 4 * plain.values)
    _, _, t = path_endpoints(range(50), Z_DIM, endpoints=True)
    assert set(t.tolist()) == {0.0, 1.0}
    assert perceptual_path_length(generator, squared_l2, range(3), endpoints=True).to_dict()["t_sampling"] == "end"


class _FixedConvFeatures(nn.Module):
    """A frozen random conv as the perceptual network: feature_maps(images) -> [(B, 8, H, W)]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)

    def feature_maps(self, images):
        return [self.conv(images)]


class _ImageGenerator(nn.Module):
    """G(z, y) = tanh(W z + b_y) as a (1, 4, 4) 'latent' that decode upsamples into an image."""

    def __init__(self, weight_scale: float):
        super().__init__()
        self.z_dim, self.latent_shape = Z_DIM, (1, 4, 4)
        self.linear = nn.Linear(Z_DIM, 16)
        self.linear.weight.data.mul_(weight_scale)
        self.bias = nn.Embedding(3, 16)

    def forward(self, z, labels):
        return torch.tanh(self.linear(z) + self.bias(labels)).view(-1, 1, 4, 4)


def test_with_the_project_perceptual_distance_on_decoded_images():
    distance = PerceptualLoss(_FixedConvFeatures()).distance
    decode = lambda latents: torch.nn.functional.interpolate(latents, scale_factor=4)  # noqa: E731
    labels = torch.tensor([0, 1, 2, 0])
    smooth = perceptual_path_length(_ImageGenerator(1.0), distance, range(4), labels, decode=decode)
    assert torch.isfinite(smooth.values).all() and (smooth.values > 0).all()
    constant = perceptual_path_length(_ImageGenerator(0.0), distance, range(4), labels, decode=decode)
    assert constant.mean == 0.0  # a generator that ignores z has path length 0


def test_bad_arguments():
    generator = LinearGenerator([1.0])
    with pytest.raises(ValueError, match="eps must be > 0"):
        perceptual_path_length(generator, squared_l2, [1], eps=0.0)
    with pytest.raises(ValueError, match="at least one seed"):
        perceptual_path_length(generator, squared_l2, [])
    with pytest.raises(ValueError, match=r"2 seeds but labels of shape \(3,\)"):
        perceptual_path_length(generator, squared_l2, [1, 2], torch.tensor([0, 0, 0]))
