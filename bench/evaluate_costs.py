"""What evaluate's measurements cost, each exact route beside the one it replaced, in interleaved rounds (a shared
machine's load hits both alike; compare the medians of one run, not across runs).

    python -m bench.evaluate_costs                       # KID, FD, precision/recall at n = 1000, D = 1280
    python -m bench.evaluate_costs --ar models/ar --vae models/vae --batch 250   # + one guided AR batch
    python -m bench.evaluate_costs --teacher models/ldm --vae models/vae --batches 125,250,500   # + batch sizes

- KID (50 subsets of n/2): each subset's three kernels (before) vs the whole sets' Gram matrices once (now).
- FD: the traces of the two (D, D) covariances (before) vs sums of variances (now).
- precision/recall: two coverage passes (before) vs one pass over the shared distances (now).
- AR sampling: the language model's growing key/value cache (before) vs one allocated once (now); same tokens.
- Batch sizes: the teacher's images/s (10 guided Euler steps, decoding included: on a CPU in passes of at most
  ``gmpipe.nn.autoencoder.CPU_PASS_IMAGES``), EfficientNet-Lite0 features/s, and the autoencoder's decoding and
  encoding alone, one pass per batch (the curve behind ``CPU_PASS_IMAGES``), on 500 images at each batch size (at the
  threads torch is given: ``--threads``, the demo's 2 by default; the autoencoder under the teacher's ``autocast``, as
  ``generate`` decodes).

As a section of ``python -m bench`` (:func:`run`): the metric cases always, on random features (the cost does not
depend on the values); the AR case when ROOT/models/ar exists and the batch sizes when ROOT/models/ldm does (both
with ROOT/models/vae), at the threads the bench runs with.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import gmpipe.eval.kid as kid
from bench.measure import interleave, median, speedup
from bench.report import Section
from gmpipe.eval.frechet import feature_statistics, frechet_distance_from_features, trace_sqrt_product
from gmpipe.eval.precision_recall import knn_radii, manifold_coverage, precision_recall

SIZES = {
    "full": dict(n=1000, dim=1280, rounds=3, ar_batch=250, batches=(125, 250, 500), batch_images=500),
    "quick": dict(n=200, dim=128, rounds=2, ar_batch=4, batches=(4, 8), batch_images=8),
}
# (what is compared, the case before, the case now) among the cases below.
METRIC_PAIRS = [("KID, 50 subsets of n/2: Gram matrices once vs per-subset kernels", "KID before", "KID now"),
                ("FD: sums of variances vs traces of the (D, D) covariances", "FD before", "FD now"),
                ("precision/recall: one pass vs two coverage passes", "P/R before", "P/R now")]
AR_PAIR = ("AR sampling: preallocated vs growing key/value cache", "AR growing cache (before)",
           "AR preallocated cache (now)")


def timed_values(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[tuple[float, object]]]:
    """(seconds, value) of every case once per round, in interleaved rounds (``bench.measure.interleave``)."""

    def with_seconds(case: Callable[[], object]) -> Callable[[], tuple[float, object]]:
        def timed_case() -> tuple[float, object]:
            start = time.perf_counter()
            value = case()
            return time.perf_counter() - start, value

        return timed_case

    return interleave({name: with_seconds(case) for name, case in cases.items()}, rounds)


def timed(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, object]]]:
    """Run every case ``repeats`` times, interleaved; print each one's median seconds and its last value."""
    results = timed_values(cases, repeats)
    for name, runs in results.items():
        seconds = [s for s, _ in runs]
        print(f"{name}: median {np.median(seconds):.2f} s {[round(s, 2) for s in seconds]} -> {runs[-1][1]}",
              flush=True)
    return results


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


def ar_cases(model_dir: str, vae_dir: str, batch: int) -> tuple[dict[str, Callable[[], object]], dict]:
    """The two cache cases on ``batch`` guided samples, and the tokens each one drew last (by ``preallocated``)."""
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

    return {AR_PAIR[1]: lambda: sample(False), AR_PAIR[2]: lambda: sample(True)}, tokens


def batch_cases(teacher_dir: str, vae_dir: str, batches: list[int], n: int = 500) -> dict[str, Callable[[], object]]:
    """Per batch size, on n images: the teacher's images/s, the feature network's, and its autoencoder's decoding (of
    normalized latents) and encoding (of the teacher's images) alone, one pass of the network per batch."""
    from gmpipe.generator import load_generator
    from gmpipe.nn.features import EffNetLite0Features
    from gmpipe.pixels import uint8_to_signed

    teacher, extractor = load_generator(teacher_dir, autoencoder=vae_dir), EffNetLite0Features(64)
    labels, seeds = [i % len(teacher.conditioning.class_names) for i in range(n)], list(range(n))
    images = uint8_to_signed(teacher.generate(labels, seeds, batch_size=max(batches), steps=10)[0])

    latents = torch.randn(n, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))

    def images_per_second(work: Callable[[], object]) -> float:
        start = time.perf_counter()
        work()
        return round(n / (time.perf_counter() - start), 1)

    @torch.no_grad()
    def in_batches(network: Callable[[torch.Tensor], object], inputs: torch.Tensor, batch: int) -> None:
        for first in range(0, n, batch):  # under the teacher's autocast, as generate decodes
            with teacher.autocast():
                network(inputs[first:first + batch].to(teacher.device))

    work = {"generate": lambda batch: teacher.generate(labels, seeds, batch_size=batch, steps=10),
            "features": lambda batch: extractor.extract(images, batch_size=batch),
            "decode": lambda batch: in_batches(teacher.autoencoder.decode, latents, batch),
            "encode": lambda batch: in_batches(teacher.autoencoder.encode, images, batch)}
    return {f"{kind} images/s, batch {batch}": (lambda run=run, batch=batch: images_per_second(lambda: run(batch)))
            for batch in batches for kind, run in work.items()}


def _same(before: object, now: object) -> bool:
    """Whether two cases' results agree to float rounding (a number or a tuple of numbers each)."""
    return bool(np.allclose(np.ravel(np.asarray(before, dtype=float)), np.ravel(np.asarray(now, dtype=float)),
                            rtol=1e-6, atol=1e-12))


def pair_row(section: Section, what: str, before: list[tuple[float, object]], now: list[tuple[float, object]],
             same: bool | None) -> None:
    """One row (median seconds before and now, the median per-round speed-up, whether the results agree) and its
    ratio."""
    before_s, now_s = [s for s, _ in before], [s for s, _ in now]
    ratio = speedup(now_s, before_s)
    section.rows.append([what, median(before_s), median(now_s), ratio, "-" if same is None else str(same)])
    section.ratios[what] = ratio


def run(size: str = "full", root: Path | None = None) -> dict:
    s = SIZES[size]
    section = Section("evaluate_costs", f"Evaluate's measurements, each exact route vs the one it replaced "
                      f"(n = {s['n']} features of D = {s['dim']})", s["rounds"],
                      ["what (now vs before)", "before: median s", "now: median s", "speed-up", "same result"], [])
    results = timed_values(metric_cases(s["n"], s["dim"]), s["rounds"])
    for what, before, now in METRIC_PAIRS:
        pair_row(section, what, results[before], results[now], _same(results[before][-1][1], results[now][-1][1]))
    samples = {name: [seconds for seconds, _ in runs] for name, runs in results.items()}
    models = None if root is None else root / "models"
    vae = None if models is None else models / "vae"
    if models is not None and (models / "ar").is_dir() and vae.is_dir():
        cases, tokens = ar_cases(str(models / "ar"), str(vae), s["ar_batch"])
        ar = timed_values(cases, 1)
        pair_row(section, f"{AR_PAIR[0]} ({s['ar_batch']} guided samples, 1 round)", ar[AR_PAIR[1]],
                 ar[AR_PAIR[2]], torch.equal(tokens[True], tokens[False]))
        samples.update({name: [seconds for seconds, _ in runs] for name, runs in ar.items()})
    else:
        section.notes.append("AR cache case not run: needs ROOT/models/ar and ROOT/models/vae (--root)")
    if models is not None and (models / "ldm").is_dir() and vae.is_dir():
        batches, images = list(s["batches"]), s["batch_images"]
        sized = timed_values(batch_cases(str(models / "ldm"), str(vae), batches, images), s["rounds"])
        for kind, label in (("generate", "teacher, 10 guided steps + decoding"), ("features", "EffNet-Lite0 features"),
                            ("decode", "autoencoder decoding"), ("encode", "autoencoder encoding")):
            first = sized[f"{kind} images/s, batch {batches[0]}"]
            for batch in batches[1:]:
                pair_row(section, f"{label}, {images} images: batch {batch} vs {batches[0]}", first,
                         sized[f"{kind} images/s, batch {batch}"], None)
        samples.update({name: [seconds for seconds, _ in runs] for name, runs in sized.items()})
    else:
        section.notes.append("batch-size cases not run: need ROOT/models/ldm and ROOT/models/vae (--root)")
    section.notes.append(f"{torch.get_num_threads()} torch thread(s); random features for the metric cases (their "
                         "cost does not depend on the values)")
    return section.finish(samples)


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
        timed(ar_cases(args.ar, args.vae, args.batch)[0], 1)
    if args.teacher:
        torch.set_num_threads(args.threads)
        timed(batch_cases(args.teacher, args.vae, [int(b) for b in args.batches.split(",")]), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
