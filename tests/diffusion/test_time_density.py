"""Time densities: logit-normal moments, the resolution shift, composition and reproducibility."""

from __future__ import annotations

import pytest
import torch

from gmpipe.diffusion import get_time_density, resolution_shift
from gmpipe.diffusion.time_density import LogitNormalTime, ShiftedTime, UniformTime

N = 20_000


def test_logit_normal_logits_have_the_requested_mean_and_std():
    t = get_time_density("logit_normal", mean=0.5, std=1.3).sample(
        N, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert ((t > 0) & (t < 1)).all()
    logits = torch.logit(t)
    assert logits.mean().item() == pytest.approx(0.5, abs=4 * 1.3 / N**0.5)
    assert logits.std().item() == pytest.approx(1.3, rel=0.03)


def test_uniform_covers_the_unit_interval():
    t = get_time_density("uniform").sample(N, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.dtype == torch.float32 and t.shape == (N,)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_resolution_shift_is_monotone_and_fixes_the_ends(shift):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = resolution_shift(t, shift)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted.diff() > 0).all()
    if shift == 1.0:
        torch.testing.assert_close(shifted, t)
    elif shift > 1:
        assert (shifted[1:-1] > t[1:-1]).all()  # toward noise


def test_resolution_shift_formula_and_inverse():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(resolution_shift(t, 3.0), torch.tensor([0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(resolution_shift(resolution_shift(t, 3.0), 1 / 3), t)
    with pytest.raises(ValueError, match="positive"):
        resolution_shift(t, 0.0)


def test_shifted_density_is_the_base_density_then_the_shift():
    density = get_time_density("logit_normal", shift=3.0)
    assert density == ShiftedTime(LogitNormalTime(), 3.0)
    assert get_time_density("uniform", shift=1.0) == UniformTime()
    shifted = density.sample(64, generator=torch.Generator().manual_seed(3))
    base = LogitNormalTime().sample(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shifted, resolution_shift(base, 3.0))
    assert get_time_density(**density.to_config()) == density
    with pytest.raises(ValueError, match="positive"):
        ShiftedTime(UniformTime(), -1.0)


def test_sampling_is_reproducible_with_a_generator():
    density = get_time_density("logit_normal")
    first = density.sample(8, generator=torch.Generator().manual_seed(11))
    second = density.sample(8, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, second)


def test_unknown_density_is_rejected():
    with pytest.raises(ValueError, match="unknown time density 'beta'"):
        get_time_density("beta")
