"""``evaluate:`` sample counts, sweeps and the feature network behind every distance."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gmpipe.config.base import Precision, Section, Seed, one_of
from gmpipe.registry import SAMPLERS

Steps = Annotated[int, Field(ge=1, le=1000)]


class EvaluateConfig(Section):
    """Every Frechet distance is reported with its n; distances are compared only at equal n.

    ``n_samples`` generated images (and as many real test images) for the headline metrics of each model;
    ``sweep_samples`` for each point of the NFE and guidance sweeps. ``fid_module`` (``package.module:factory``)
    and ``fid_weights`` (a local safetensors or weights-only file) add true FID on that network (e.g. an
    Inception-v3 returning 2048-d pool features); EfficientNet-Lite0 distances are always reported as fd_effnet.
    ``likelihood_samples`` test images for the test likelihood of every model whose family defines one (0: off).
    ``precision``: of the models' network evaluations while they generate (sampling and decoding; "bf16": bfloat16
    autocast: 1.5-2x faster sampling on a CPU with bf16 instructions); the judges (feature network, classifier) and the
    likelihoods always run in float32. ``metrics.json`` records it (``machine.generation_precision``).
    ``batch_size`` images per generating batch; ``feature_batch_size`` per forward pass of the feature networks
    (small is fast on a CPU, larger on a GPU; the features do not depend on it). ``classifier_precision``: the
    classifier's forward passes while it trains on the real data ("bf16": bfloat16 autocast, 1.7x faster here at
    equal test accuracy); it always predicts in float32.
    """

    seed: Seed = 0
    n_samples: Annotated[int, Field(ge=10)] = 1000
    sweep_samples: Annotated[int, Field(ge=10)] = 500
    feature_image_size: Annotated[int, Field(ge=32, le=512)] = 64
    batch_size: Annotated[int, Field(ge=1)] = 250
    feature_batch_size: Annotated[int, Field(ge=1)] = 64  # gmpipe.nn.features.FEATURE_BATCH_SIZE (no torch here)
    precision: Precision = "fp32"
    sweep_samplers: list[one_of(SAMPLERS)] = ["euler", "heun", "ddim", "ddpm", "sde"]
    sweep_steps: list[Steps] = [1, 2, 4, 8, 16, 32, 50]
    guidance_sweep: list[Annotated[float, Field(ge=0.0, le=50.0)]] = [0.0, 0.5, 1.0, 2.0, 3.0, 5.0]
    student_steps: list[Steps] = [1, 2, 4]
    likelihood_samples: Annotated[int, Field(ge=0, le=100_000)] = 256
    classifier_steps: Annotated[int, Field(ge=1)] = 1500
    classifier_batch_size: Annotated[int, Field(ge=1)] = 128
    classifier_precision: Precision = "fp32"
    kid_subsets: Annotated[int, Field(ge=1)] = 50
    pr_k: Annotated[int, Field(ge=1)] = 3
    fid_module: str | None = None
    fid_weights: str | None = None
