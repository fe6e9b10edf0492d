"""Spherical interpolation in the generator's noise space, and the latents along such paths.

z ~ N(0, I) in d dimensions concentrates near the sphere of radius sqrt(d); the straight line between two such
points passes well inside it, where the generator saw almost no training noise. Slerp (Shoemake 1985; White 2016,
"Sampling Generative Networks") follows the great circle instead:

    slerp(z0, z1; t) = sin((1 - t) theta) / sin(theta) z0 + sin(t theta) / sin(theta) z1,
    theta = angle between z0 and z1

At t = 0 and 1 it gives z0 and z1; for |z0| = |z1| every point has that norm; as theta -> 0 it tends to the
straight line (1 - t) z0 + t z1, which is used for (anti)parallel vectors, where the great circle is degenerate
(parallel) or not unique (antiparallel).
"""

from __future__ import annotations

import torch

from gmpipe.gan.generator import ConditionalGenerator

_MIN_SIN_THETA = 1e-7


def angle_between(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """theta in [0, pi] between z0 and z1, (..., d) each -> (...,). Computed as 2 atan2(|a - b|, |a + b|) on the
    unit vectors a, b, which stays accurate for nearly parallel vectors (arccos of the cosine does not)."""
    a = z0 / z0.norm(dim=-1, keepdim=True)
    b = z1 / z1.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """slerp(z0, z1; t) (module docstring): z0, z1 (..., d), t a float or a tensor broadcastable to (...,)
    -> (..., d). Values of t outside [0, 1] continue along the same circle."""
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device)[..., None]
    theta = angle_between(z0, z1)[..., None]
    sin_theta = torch.sin(theta)
    curved = sin_theta > _MIN_SIN_THETA
    safe_sin = torch.where(curved, sin_theta, torch.ones_like(sin_theta))
    along_circle = (torch.sin((1 - t) * theta) * z0 + torch.sin(t * theta) * z1) / safe_sin
    straight = (1 - t) * z0 + t * z1
    return torch.where(curved, along_circle, straight)


def slerp_path(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` points from z0 to z1 at t = 0, 1/(steps-1), ..., 1: z0, z1 (P, d) -> (P, steps, d)."""
    if steps < 2:
        raise ValueError(f"an interpolation path needs steps >= 2, got {steps}")
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)
    return slerp(z0[:, None], z1[:, None], t[None, :])


@torch.no_grad()
def interpolation_latents(generator: ConditionalGenerator, z0: torch.Tensor, z1: torch.Tensor,
                          labels: torch.Tensor | None, steps: int, batch_size: int = 256) -> torch.Tensor:
    """The generator's latents along ``slerp_path(z0, z1, steps)`` with the class held fixed per path:
    z0, z1 (P, z_dim), labels (P,) int64 or None -> normalized latents (P, steps, c, h, w) on the CPU.
    Decoded and laid out with ``columns=steps`` they form the interpolation grid (one path per row)."""
    paths = slerp_path(z0.double(), z1.double(), steps)  # (P, steps, d); float64: the angle of close pairs
    n_paths = paths.shape[0]
    z = paths.reshape(n_paths * steps, -1)
    flat_labels = None if labels is None else labels.repeat_interleave(steps)
    parameter = next(generator.parameters())
    chunks = []
    for start in range(0, len(z), batch_size):
        chunk_labels = None if flat_labels is None else flat_labels[start : start + batch_size].to(parameter.device)
        chunk = z[start : start + batch_size].to(parameter.device, parameter.dtype)
        chunks.append(generator(chunk, chunk_labels).cpu())
    return torch.cat(chunks).view(n_paths, steps, *generator.latent_shape)
