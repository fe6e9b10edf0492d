"""Per-sample random streams: every random draw of sample i comes from its own generator, seeded with seeds[i].

So a sample depends only on its seed (and its condition and settings), never on which batch it was drawn in, how
large that batch was, or how many processes drew the whole set. ``SampleNoise`` plays the part of a
``torch.Generator`` wherever gmpipe draws noise (``gmpipe.diffusion.noise``): a draw of shape (B, ...) takes row i
from stream i, on the CPU, so the numbers do not depend on the device either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# torch.Generator.manual_seed takes 64-bit seeds.
MAX_SEED = 2**64 - 1


class SampleNoise:
    """One CPU ``torch.Generator`` per sample; ``randn`` / ``rand`` draw (B, ...) with row i from stream i."""

    device = torch.device("cpu")

    def __init__(self, seeds: Sequence[int]) -> None:
        bad = [seed for seed in seeds if not 0 <= int(seed) <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds must be in 0..2**64 - 1 (got {bad[0]})")
        self.seeds = [int(seed) for seed in seeds]
        self._streams = [torch.Generator().manual_seed(seed) for seed in self.seeds]

    @classmethod
    def from_generators(cls, generators: Sequence[torch.Generator]) -> SampleNoise:
        """Streams that are the given CPU generators (drawing advances them): a diffusers pipeline's ``generator``
        list, one per image. ``[torch.Generator().manual_seed(s) for s in seeds]`` draws what ``SampleNoise(seeds)``
        draws; one generator repeated gives its rows one after another."""
        if any(generator.device.type != "cpu" for generator in generators):
            raise ValueError("per-image generators must be CPU generators (the noise is drawn on the CPU)")
        noise = cls.__new__(cls)
        noise.seeds = [generator.initial_seed() for generator in generators]
        noise._streams = list(generators)
        return noise

    def __len__(self) -> int:
        return len(self._streams)

    def take(self, start: int, stop: int) -> SampleNoise:
        """The streams of samples start..stop - 1 (shared, not copied: drawing from either advances both)."""
        part = SampleNoise.__new__(SampleNoise)
        part.seeds, part._streams = self.seeds[start:stop], self._streams[start:stop]
        return part

    def _rows(self, shape: Sequence[int]) -> tuple[int, ...]:
        if not shape or shape[0] != len(self._streams):
            raise ValueError(f"a draw of shape {tuple(shape)} needs {len(self._streams)} rows, one per sample")
        return tuple(shape[1:])

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal (B, ...): row i from stream i."""
        row = self._rows(shape)
        return torch.stack([torch.randn(row, generator=stream, dtype=dtype) for stream in self._streams])

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform [0, 1) (B, ...): row i from stream i."""
        row = self._rows(shape)
        return torch.stack([torch.rand(row, generator=stream, dtype=dtype) for stream in self._streams])


def seed_block(base: int, block: int, n: int) -> list[int]:
    """n per-sample seeds of block ``block`` of a run seeded with ``base`` (a 32-bit params seed): blocks never
    overlap, so two sets of samples of one run (e.g. a sweep and the headline set) have independent noise."""
    if not 0 <= n <= 2**24 or not 0 <= block < 2**7 or not 0 <= base < 2**32:
        raise ValueError(f"seed_block: base {base}, block {block} or n {n} out of range")
    start = (base << 31) | (block << 24)
    return list(range(start, start + n))
