"""Generated sets that are never generated twice: every set of one model is the first n of one list of samples.

Sample i of a model is made from requests[i] and seeds[i] alone (``gmpipe.generator``: never from the batch it is
in), so a set of n samples at some settings is the first n of any larger set at the same settings, and two
measurements at equal settings are measurements of the same images. ``SampleBank`` keeps, per resolved settings,
the samples made so far (and their features, once measured), and ``draw(n, **settings)`` generates only the samples
it does not hold yet: the guidance sweep's point at the headline w (n = 300) is the headline set's first 300, and
the NFE sweep's point at the default sampler and steps is that guidance point.

A sample that is reused is identical to the one a fresh call would make, up to float rounding in the network
(another batch composition may sum in another order, so an image may differ by one level in a pixel on a rounding
boundary). Images per second of a set: all its samples over all the wall time spent making them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gmpipe.conditioning import Request
from gmpipe.generator import Generator

SettingsKey = tuple[tuple[str, Any], ...]


@dataclass
class SampleSet:
    """The first ``len(images)`` samples at one setting: uint8 images (k, C, H, W), the NFE per image, the wall
    seconds spent generating them, and the features (j, D) of the first j <= k (float32: the feature networks
    compute in float32, so nothing is lost)."""

    images: np.ndarray
    nfe: int
    seconds: float
    features: np.ndarray | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.images) / max(self.seconds, 1e-9)


@dataclass
class SampleBank:
    """A model's generated samples per setting, each a prefix of the one list ``requests`` (None: unconditional)
    and ``seeds`` (the most any set needs); see the module docstring."""

    generator: Generator
    requests: Sequence[Request] | None
    seeds: Sequence[int]
    batch_size: int
    sets: dict[SettingsKey, SampleSet] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.requests is not None and len(self.requests) != len(self.seeds):
            raise ValueError(f"{len(self.requests)} requests but {len(self.seeds)} seeds: give one of each per sample")

    def key(self, settings: dict[str, Any]) -> SettingsKey:
        """The model's full settings with ``settings`` applied, as a key: two calls that name the defaults
        differently (``steps=50`` given or left out) meet in one set."""
        return tuple(sorted(self.generator.resolve_settings(settings).items()))

    def draw(self, n: int, **settings: Any) -> SampleSet:
        """The first ``n`` samples at ``settings`` (a view of the held set, which grows to n if it is shorter):
        only the samples not made before are generated."""
        if not 0 < n <= len(self.seeds):
            raise ValueError(f"asked for {n} samples; this bank holds seeds for 1..{len(self.seeds)}")
        key = self.key(settings)
        held = self.sets.get(key)
        have = 0 if held is None else len(held.images)
        if have < n:
            start = time.perf_counter()
            requests = None if self.requests is None else list(self.requests[have:n])
            images, nfe = self.generator.generate(requests, list(self.seeds[have:n]), batch_size=self.batch_size,
                                                  **settings)
            seconds = time.perf_counter() - start
            if held is None:
                held = self.sets[key] = SampleSet(images, nfe, seconds)
            else:
                if nfe != held.nfe:
                    raise RuntimeError(f"the same settings spent {nfe} network evaluations, before {held.nfe}")
                held.images, held.seconds = np.concatenate([held.images, images]), held.seconds + seconds
        return SampleSet(held.images[:n], held.nfe, held.seconds * n / len(held.images),
                         None if held.features is None else held.features[: min(n, len(held.features))])

    def features(self, n: int, extract: Callable[[np.ndarray], np.ndarray], **settings: Any) -> np.ndarray:
        """Features (n, D) of the first ``n`` samples at ``settings`` (drawn first if needed); ``extract`` maps
        uint8 images (m, C, H, W) to features (m, D) and runs only on the samples not measured before."""
        self.draw(n, **settings)
        held = self.sets[self.key(settings)]
        have = 0 if held.features is None else len(held.features)
        if have < n:
            new = np.asarray(extract(held.images[have:n]))
            narrow = new.astype(np.float32)
            stored = narrow if np.array_equal(narrow.astype(new.dtype), new) else new  # float32 where exact
            held.features = stored if held.features is None else np.concatenate([held.features, stored])
        return held.features[:n].astype(np.float64)
