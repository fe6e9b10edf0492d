"""The teacher's quality against its training: a study outside the pipeline, not a section of ``python -m bench``.

    OMP_NUM_THREADS=2 python -m bench.teacher_quality ROOT ['{"steps": 3000}']

ROOT is a copy of a finished demo project (data/prepared, data/latents, models/vae, models/ldm, params.yaml). With
a JSON object of ``train_ldm`` overrides it first trains the teacher again with ``train_ldm``'s own ``run`` on ROOT's
params plus those overrides, writing models/ldm, checkpoints/train_ldm and reports/train_ldm under ROOT (work on a
copy: the old teacher is replaced). Then it measures the teacher as ``evaluate`` measures its headline rows (the
same real images, seeds, labels and sample bank, ``gmpipe.stages.evaluate.evaluate_teacher``) at the demo's sampler
and steps, at w = 0.5 and w = 1, at ``evaluate.n_samples``, and prints the FD, its ratio to the real-data floor at
that n, the class accuracy, precision and recall. On an untouched demo project it reproduces that run's
``reports/metrics.json`` teacher rows.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from gmpipe.config.params import load_params
from gmpipe.eval.timings import SectionTimer
from gmpipe.paths import Paths
from gmpipe.precision import resolve_precision

GUIDANCE = (0.5, 1.0)  # the demo's headline w and the w its students reproduce
REPORTED = ("fd_effnet", "accuracy", "precision", "recall", "kid")


def measure_teacher(root: Path, evaluate_overrides: dict | None = None, log=print,
                    guidance: tuple[float, ...] = GUIDANCE) -> dict:
    """The teacher of ROOT at each w of ``guidance`` at ``evaluate.n_samples``, measured as ``evaluate`` does
    (no NFE sweep and no likelihood; the guidance sweep at ``sweep_samples`` is the first images of the same
    sets)."""
    from gmpipe.stages import evaluate

    params = load_params(root / "params.yaml")
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    config = params.evaluate.replace(**(evaluate_overrides or {}))
    config = config.replace(precision=resolve_precision(config.precision, device, "evaluate.precision"),
                            classifier_precision=resolve_precision(config.classifier_precision, device,
                                                                   "evaluate.classifier_precision"),
                            guidance_sweep=list(guidance), sweep_samplers=[], likelihood_samples=0)
    paths = Paths(root)
    class_names = evaluate.load_manifest(paths.prepared)["class_names"]
    torch.manual_seed(config.seed)
    timer = SectionTimer(log=log, prefix="teacher_quality: ")
    reference, real = evaluate.build_reference(config, paths, class_names, device, timer)
    start = time.perf_counter()
    _, by_w, guidance_rows, _, _ = evaluate.evaluate_teacher(
        config, paths, reference, class_names, real["classifier_test_accuracy"], set(guidance), None, device, timer)
    n = next(iter(by_w.values()))["n"]
    floor = real["floor"][str(n)]["fd_effnet"]
    rows = {f"{w:g}": {**{key: row[key] for key in REPORTED}, "x_floor": row["fd_effnet"] / floor}
            for w, row in sorted(by_w.items())}
    return {"n": n, "floor": floor, "by_w": rows, "seconds": time.perf_counter() - start,
            "sweep": {f"{row['w']:g}": {"n": row["n"], "fd_effnet": row["fd_effnet"]} for row in guidance_rows}}


def main(argv: list[str]) -> None:
    root = Path(argv[0])
    if len(argv) > 1:
        from gmpipe.stages import train_ldm

        params = load_params(root / "params.yaml")
        config = params.train_ldm.replace(**json.loads(argv[1]))
        start = time.perf_counter()
        summary = train_ldm.run(config, params.compute, Paths(root))
        print(f"train_ldm: {time.perf_counter() - start:.1f} s wall, {summary.get('steps')} steps", flush=True)
    print(json.dumps(measure_teacher(root), indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    main(sys.argv[1:])
