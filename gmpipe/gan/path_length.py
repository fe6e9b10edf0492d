"""Perceptual path length (Karras et al. 2019, "A Style-Based Generator Architecture for GANs", sec. 4.1, eq. 2):
how smoothly the generated image changes along slerp paths in noise space,

    l_Z = E[ 1/eps^2 d(decode(G(slerp(z0, z1; t), y)), decode(G(slerp(z0, z1; t + eps), y))) ],
    z0, z1 ~ N(0, I),  t ~ U(0, 1)  ("full"; t in {0, 1} for "end"),  eps = 1e-4

where d is a perceptual distance on decoded images (for this project the LPIPS-style
``gmpipe.vae.perceptual.PerceptualLoss.distance``), itself a squared distance, hence eps^2. The class y is held
fixed along a path. A small value means no abrupt changes between nearby noise vectors.

Each pair i draws (z0, z1, t) from its own ``torch.Generator`` seeded with seeds[i] (``path_endpoints``), so its
term does not depend on the batch size or on the other pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gmpipe.gan.generator import ConditionalGenerator
from gmpipe.gan.interpolation import slerp

# d(images_a, images_b) -> (B,) per-sample distances, e.g. PerceptualLoss.distance
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# normalized latents (B, c, h, w) -> images (B, C, H, W), e.g. the autoencoder's decoder after denormalizing
Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PathLength:
    """The estimate l_Z (``mean``) and its per-pair terms ``values`` (n,), with the eps and t sampling used."""

    mean: float
    values: torch.Tensor
    eps: float
    endpoints: bool

    def to_dict(self) -> dict:
        """mean, its standard error, n, eps and the t sampling ("full" or "end"), for a metrics file."""
        n = len(self.values)
        stderr = float(self.values.std() / n**0.5) if n > 1 else float("nan")
        return {"ppl": self.mean, "ppl_stderr": stderr, "n": n, "eps": self.eps,
                "t_sampling": "end" if self.endpoints else "full"}


def path_endpoints(seeds: Sequence[int], z_dim: int, endpoints: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z0 (n, z_dim), z1 (n, z_dim), t (n,)) in float64: pair i draws z0, z1 ~ N(0, I) and then t ~ U(0, 1)
    from ``torch.Generator().manual_seed(seeds[i])``; with ``endpoints`` t is rounded to 0 or 1."""
    z0, z1, t = [], [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        z0.append(torch.randn(z_dim, generator=generator, dtype=torch.float64))
        z1.append(torch.randn(z_dim, generator=generator, dtype=torch.float64))
        t.append(torch.rand((), generator=generator, dtype=torch.float64))
    t = torch.stack(t) if t else torch.empty(0, dtype=torch.float64)
    if endpoints:
        t = t.round()
    empty = torch.empty(0, z_dim, dtype=torch.float64)
    return (torch.stack(z0) if z0 else empty), (torch.stack(z1) if z1 else empty), t


@torch.no_grad()
def path_length_terms(generator: ConditionalGenerator, z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor,
                      labels: torch.Tensor | None, distance: Distance, decode: Decode | None = None,
                      eps: float = 1e-4) -> torch.Tensor:
    """1/eps^2 d(decode(G(slerp(z0, z1; t), y)), decode(G(slerp(z0, z1; t + eps), y))) per pair: z0, z1
    (B, z_dim), t (B,), labels (B,) or None -> (B,) on the CPU. ``decode`` None measures d on the latents.
    slerp is computed in float64 and cast to the generator's dtype."""
    parameter = next(generator.parameters())
    t = t.double()
    z_a = slerp(z0.double(), z1.double(), t)
    z_b = slerp(z0.double(), z1.double(), t + eps)
    z = torch.cat([z_a, z_b]).to(parameter.device, parameter.dtype)
    both_labels = None if labels is None else torch.cat([labels, labels]).to(parameter.device)
    images = generator(z, both_labels)
    if decode is not None:
        images = decode(images)
    images_a, images_b = images.chunk(2)
    return (distance(images_a, images_b) / eps**2).double().cpu()


def perceptual_path_length(generator: ConditionalGenerator, distance: Distance, seeds: Sequence[int],
                           labels: torch.Tensor | None = None, decode: Decode | None = None, eps: float = 1e-4,
                           endpoints: bool = False, batch_size: int = 64) -> PathLength:
    """l_Z over len(seeds) pairs (module docstring), the class of pair i being labels[i] (labels (n,) int64, or
    None for an unconditional generator); evaluated in chunks of ``batch_size`` pairs (2 x batch_size images)."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    n = len(seeds)
    if n == 0:
        raise ValueError("perceptual path length needs at least one seed")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{n} seeds but labels of shape {tuple(labels.shape)}")
    z0, z1, t = path_endpoints(seeds, generator.z_dim, endpoints)
    values = torch.cat([
        path_length_terms(generator, z0[i : i + batch_size], z1[i : i + batch_size], t[i : i + batch_size],
                          None if labels is None else labels[i : i + batch_size], distance, decode, eps)
        for i in range(0, n, batch_size)
    ])
    return PathLength(mean=float(values.mean()), values=values, eps=eps, endpoints=endpoints)
