"""What evaluate's measurements cost, each exact route beside the one it replaced, interleaved repeats on one
thread (a shared machine's load hits both alike; compare the medians of one run, not across runs).

    python -m bench.evaluate_costs                       # KID, FD, precision/recall at n = 1000, D = 1280
    python -m bench.evaluate_costs --ar models/ar --vae models/vae --batch 250   # + one guided AR batch
    python -m bench.evaluate_costs --teacher models/ldm --vae models/vae --batches 125,250,500   # + batch sizes

- KID (50 subsets of n/2): each subset's three kernels (before) vs the whole sets' Gram matrices once (now).
- FD: the traces of the two (D, D) covariances (before) vs sums of variances (now).
- precision/recall: two coverage passes (before) vs one pass over the shared distances (now).
- AR sampling: the language model's growing key/value cache (before) vs one allocated once (now); same tokens.
- Batch sizes: the teacher's images/s (10 guided Euler steps, decoding included) and EfficientNet-Lite0 features/s
  on 500 images at each batch size (at the threads torch is given: ``--threads``, the demo's 2 by default).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

import gmpipe.eval.kid as kid
from gmpipe.eval.frechet import feature_statistics, frechet_distance_from_features, trace_sqrt_product
from gmpipe.eval.precision_recall import knn_radii, manifold_coverage, precision_recall


def timed(cases: dict[str, Callable[[], object]], repeats: int) -> None:
    """Run every case ``repeats`` times, interleaved; print each one's median seconds and its last value."""
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    values = {}
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            values[name] = case()
            seconds[name].append(time.perf_counter() - start)
    for name in cases:
        print(f"{name}: median {np.median(seconds[name]):.2f} s {[round(s, 2) for s in seconds[name]]} "
              f"-> {values[name]}", flush=True)


def metric_cases(n: int, dim: int) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) + 0.1
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def kid_per_subset():
        limit, kid._MAX_GRAM_ENTRIES = kid._MAX_GRAM_ENTRIES, 0
        try:
            return kid.kernel_distance(a, b, 50, n // 2)
        finally:
            kid._MAX_GRAM_ENTRIES = limit

    def fd_full_covariances():
        (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
        return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(a, b))

    return {"KID before": kid_per_subset, "KID now": lambda: kid.kernel_distance(a, b, 50, n // 2),
            "FD before": fd_full_covariances, "FD now": lambda: frechet_distance_from_features(a, b),
            "P/R before": lambda: (manifold_coverage(tb, ta, knn_radii(ta, 3)),
                                   manifold_coverage(ta, tb, knn_radii(tb, 3))),
            "P/R now": lambda: tuple(precision_recall(ta, tb, 3))}


def ar_cases(model_dir: str, vae_dir: str, batch: int) -> dict[str, Callable[[], object]]:
    from gmpipe.ar.sampling import sample_tokens
    from gmpipe.generator import load_generator

    model = load_generator(model_dir, autoencoder=vae_dir).model
    labels, seeds = torch.arange(batch) % model.num_classes, list(range(batch))
    tokens = {}

    def sample(preallocated: bool):
        cache_of = type(model).sampling_cache
        if not preallocated:
            type(model).sampling_cache = lambda self: None  # next_logits then starts the model's own growing cache
        try:
            tokens[preallocated] = sample_tokens(model, labels, seeds, guidance=1.0)[0]
        finally:
            type(model).sampling_cache = cache_of
        same = torch.equal(tokens[True], tokens[False]) if len(tokens) == 2 else "-"
        return f"{batch} samples, same tokens as the other cache: {same}"

    return {"AR growing cache (before)": lambda: sample(False), "AR preallocated cache (now)": lambda: sample(True)}


def batch_cases(teacher_dir: str, vae_dir: str, batches: list[int], n: int = 500) -> dict[str, Callable[[], object]]:
    from gmpipe.generator import load_generator
    from gmpipe.nn.features import EffNetLite0Features
    from gmpipe.pixels import uint8_to_signed

    teacher, extractor = load_generator(teacher_dir, autoencoder=vae_dir), EffNetLite0Features(64)
    labels, seeds = [i % len(teacher.conditioning.class_names) for i in range(n)], list(range(n))
    images = uint8_to_signed(teacher.generate(labels, seeds, batch_size=max(batches), steps=10)[0])

    def generate(batch: int) -> str:
        start = time.perf_counter()
        teacher.generate(labels, seeds, batch_size=batch, steps=10)
        return f"{n / (time.perf_counter() - start):.1f} images/s"

    def features(batch: int) -> str:
        start = time.perf_counter()
        extractor.extract(images, batch_size=batch)
        return f"{n / (time.perf_counter() - start):.0f} images/s"

    cases: dict[str, Callable[[], object]] = {}
    for batch in batches:
        cases[f"generate, batch {batch}"] = lambda batch=batch: generate(batch)
        cases[f"features, batch {batch}"] = lambda batch=batch: features(batch)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluate_costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ar", help="an autoregressive prior's model folder (adds its sampling)")
    parser.add_argument("--vae", default="models/vae")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--teacher", help="a latent diffusion model folder (adds the batch-size cases)")
    parser.add_argument("--batches", default="125,250,500")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the batch-size cases")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    timed(metric_cases(args.n, args.dim), args.repeats)
    if args.ar:
        timed(ar_cases(args.ar, args.vae, args.batch), 1)
    if args.teacher:
        torch.set_num_threads(args.threads)
        timed(batch_cases(args.teacher, args.vae, [int(b) for b in args.batches.split(",")]), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
