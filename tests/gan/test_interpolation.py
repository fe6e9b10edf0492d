"""Slerp against its closed form and invariants, and the generator's latents along slerp paths."""

from __future__ import annotations

import math

import pytest
import torch

from gmpipe.gan.generator import ConditionalGenerator
from gmpipe.gan.interpolation import angle_between, interpolation_latents, slerp, slerp_path


def _equal_norm_pair(d: int = 8, radius: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(2, d, generator=generator, dtype=torch.float64)
    return radius * z0 / z0.norm(), radius * z1 / z1.norm()


def test_orthogonal_unit_vectors_by_hand():
    # theta = pi / 2: slerp(e1, e2; t) = cos(t pi / 2) e1 + sin(t pi / 2) e2
    e1, e2 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for t in (0.0, 0.25, 0.5, 1.0):
        expected = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0], dtype=torch.float64)
        torch.testing.assert_close(slerp(e1, e2, t), expected)


def test_endpoints():
    z0, z1 = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0, rtol=0, atol=1e-12)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, rtol=0, atol=1e-12)


def test_norm_is_preserved_and_the_angle_grows_linearly():
    z0, z1 = _equal_norm_pair()
    theta = angle_between(z0, z1)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    path = slerp(z0.expand(11, -1), z1.expand(11, -1), t)
    torch.testing.assert_close(path.norm(dim=1), torch.full((11,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(angle_between(z0.expand(11, -1), path), t * theta)


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.2])
def test_parallel_vectors_give_the_straight_line(scale):
    z0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    z1 = scale * z0
    for t in (0.0, 0.3, 0.8, 1.0):
        torch.testing.assert_close(slerp(z0, z1, t), (1 - t) * z0 + t * z1, rtol=0, atol=1e-12)


def test_nearly_parallel_and_antiparallel_vectors_stay_finite_and_close_to_the_line():
    z0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    z1 = torch.tensor([2.0, 2e-7], dtype=torch.float64)  # 1e-7 rad apart: slerp and lerp differ by O(theta^2)
    torch.testing.assert_close(slerp(z0, z1, 0.5), 0.5 * (z0 + z1), rtol=0, atol=1e-12)
    opposite = slerp(z0, -z0, 0.25)
    torch.testing.assert_close(opposite, 0.5 * z0)  # antiparallel: no unique great circle, the straight line


def test_slerp_path_shape_and_columns():
    z0, z1 = torch.randn(3, 8), torch.randn(3, 8)
    path = slerp_path(z0, z1, 5)
    assert path.shape == (3, 5, 8)
    torch.testing.assert_close(path[:, 0], z0, rtol=0, atol=1e-5)
    torch.testing.assert_close(path[:, -1], z1, rtol=0, atol=1e-5)
    torch.testing.assert_close(path[:, 2], slerp(z0, z1, 0.5))
    with pytest.raises(ValueError, match="steps >= 2"):
        slerp_path(z0, z1, 1)


def test_interpolation_latents_start_and_end_at_the_pair_and_keep_the_class():
    generator = ConditionalGenerator((4, 8, 8), n_classes=10, z_dim=16, width=16).eval()
    z0, z1, labels = torch.randn(2, 16), torch.randn(2, 16), torch.tensor([3, 8])
    grid = interpolation_latents(generator, z0, z1, labels, steps=4, batch_size=3)
    assert grid.shape == (2, 4, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(grid[:, 0], generator(z0, labels), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grid[:, -1], generator(z1, labels), rtol=1e-5, atol=1e-5)
        middle = slerp(z0.double(), z1.double(), 1 / 3).float()
        torch.testing.assert_close(grid[:, 1], generator(middle, labels), rtol=1e-5, atol=1e-5)
