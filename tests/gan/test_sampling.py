"""Per-sample seeds: a sample depends only on its own seed and class."""

from __future__ import annotations

import pytest
import torch

from gmpipe.gan.generator import ConditionalGenerator
from gmpipe.gan.sampling import sample_latents, seeded_noise


def _generator(n_classes: int = 10) -> ConditionalGenerator:
    return ConditionalGenerator((4, 8, 8), n_classes=n_classes, z_dim=16, width=16).eval()


def test_noise_row_i_comes_from_seed_i_alone():
    z = seeded_noise([7, 3, 7], 16)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z[1], torch.randn(16, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    torch.testing.assert_close(z[0], z[2], rtol=0, atol=0)
    assert not torch.allclose(z[0], z[1])


def test_samples_do_not_depend_on_batch_size_or_neighbours():
    generator = _generator()
    seeds, labels = [11, 12, 13, 14, 15], torch.tensor([0, 3, 3, 9, 1])
    whole, nfe = sample_latents(generator, labels, seeds, batch_size=5)
    assert nfe == 1 and whole.shape == (5, 4, 8, 8)
    for batch_size in (1, 2, 3):
        torch.testing.assert_close(sample_latents(generator, labels, seeds, batch_size=batch_size)[0], whole,
                                   rtol=1e-5, atol=1e-6)
    # sample 2 alone, and among other seeds and classes, is the same latent
    alone, _ = sample_latents(generator, labels[2:3], seeds[2:3])
    others, _ = sample_latents(generator, torch.tensor([5, 3, 8]), [99, 13, 100])
    torch.testing.assert_close(alone[0], whole[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(others[1], whole[2], rtol=1e-5, atol=1e-6)


def test_unconditional_sampling_and_mismatched_labels():
    latents, nfe = sample_latents(_generator(n_classes=0), None, [1, 2])
    assert latents.shape == (2, 4, 8, 8) and nfe == 1
    with pytest.raises(ValueError, match=r"3 seeds but labels of shape \(2,\)"):
        sample_latents(_generator(), torch.tensor([0, 1]), [1, 2, 3])
