"""Sampling the latent GAN with one seed per sample: sample i is G(psi z_i, y_i) with z_i drawn from its own
``torch.Generator`` seeded with seeds[i], so it depends only on (seeds[i], y_i), never on the batch size, the
batch it lands in or the other samples. One network evaluation per sample (NFE = 1).

psi is the truncation: z is pulled toward the mode z = 0 of its prior, trading diversity for typical samples
(the z-space form of the truncation trick: StyleGAN's w' = w_avg + psi (w - w_avg) with the prior's mean 0;
BigGAN resamples components beyond a threshold instead). psi = 1 samples the prior the generator was trained on."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmpipe.gan.generator import ConditionalGenerator

NFE = 1  # one generator evaluation per sample


def seeded_noise(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """z (n, z_dim) float32 on the CPU, row i ~ N(0, I) from ``torch.Generator().manual_seed(seeds[i])``."""
    rows = [torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(rows) if rows else torch.empty(0, z_dim)


@torch.no_grad()
def sample_latents(generator: ConditionalGenerator, labels: torch.Tensor | None, seeds: Sequence[int],
                   batch_size: int = 256, truncation: float = 1.0) -> tuple[torch.Tensor, int]:
    """Normalized latents (n, c, h, w) on the CPU and the NFE per sample (1), for ``labels`` (n,) int64 (None for
    an unconditional generator), n ``seeds`` and the truncation psi (module docstring). The generator runs where
    its parameters are, in chunks of ``batch_size``; put it in eval mode first (the EMA copy already is)."""
    n = len(seeds)
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{n} seeds but labels of shape {tuple(labels.shape)}")
    device = next(generator.parameters()).device
    z = truncation * seeded_noise(seeds, generator.z_dim)
    chunks = []
    for start in range(0, n, batch_size):
        chunk_labels = None if labels is None else labels[start : start + batch_size].to(device)
        chunks.append(generator(z[start : start + batch_size].to(device), chunk_labels).cpu())
    latents = torch.cat(chunks) if chunks else torch.empty(0, *generator.latent_shape)
    return latents, NFE
