"""Classifier-free guidance limited to an interval of times: a study outside the pipeline, not a section of
``python -m bench``.

    OMP_NUM_THREADS=2 python -m bench.guidance_interval ROOT LO HI W [W ...]

ROOT is a finished demo project, as for ``bench.teacher_quality`` (it is only read). Its teacher is measured as
``evaluate`` measures its headline rows (``bench.teacher_quality.measure_teacher``: the same real images, seeds,
labels and sampler) at each guidance weight W, with guidance applied only while the sampler's time t is in [LO, HI]
(t = 1 is noise, t = 0 data): outside the interval each step takes the conditional prediction alone, one network
evaluation instead of two (Kynkaanniemi et al. 2024, guidance in a limited interval). LO = 0, HI = 1 is the
pipeline's own sampling, and reproduces the demo's teacher rows to every digit. gmpipe's samplers have no such
setting yet: the study swaps ``GuidedModelFn.__call__`` for its own run only. Prints one JSON object: each W's FD, its
ratio to the real-data floor, accuracy, precision, recall, and the network evaluations per image.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

from gmpipe.diffusion import guidance


@contextlib.contextmanager
def guidance_interval(low: float, high: float, calls: Counter):
    """Within the block every ``GuidedModelFn`` with w != 0 guides only at t in [low, high] (one time per call:
    the samplers step a whole batch at one t, a float32 time compared as it is, so a bound that falls on a grid
    time is in or out by its rounding); ``calls`` counts the guided and the plain calls."""
    guided_call = guidance.GuidedModelFn.__call__

    def call(self, x_t, t):
        if self.w == 0 or low <= float(t.reshape(-1)[0]) <= high:
            calls["guided" if self.w else "plain"] += 1
            return guided_call(self, x_t, t)
        calls["plain"] += 1
        self.calls += 1
        return self.denoiser_fn(x_t, t, self.cond)

    guidance.GuidedModelFn.__call__ = call
    try:
        yield calls
    finally:
        guidance.GuidedModelFn.__call__ = guided_call


def parse(argv: list[str]) -> tuple[Path, float, float, tuple[float, ...]]:
    """ROOT, LO, HI and the weights, or SystemExit with one message naming what is wrong."""
    if len(argv) < 4 or argv[0].startswith("-"):
        sys.exit(__doc__)
    root = Path(argv[0])
    if not (root / "params.yaml").is_file():
        sys.exit(f"guidance_interval: {root / 'params.yaml'} not found: ROOT must be a finished demo project")
    try:
        low, high, *weights = (float(value) for value in argv[1:])
    except ValueError:
        sys.exit(f"guidance_interval: LO, HI and each W must be numbers, got {' '.join(argv[1:])}")
    if not 0 <= low < high <= 1:
        sys.exit(f"guidance_interval: need 0 <= LO < HI <= 1, got LO = {low:g}, HI = {high:g}")
    if any(w < 0 for w in weights):
        sys.exit(f"guidance_interval: each W must be >= 0, got {' '.join(f'{w:g}' for w in weights)}")
    return root, low, high, tuple(weights)


def main(argv: list[str]) -> None:
    from bench import teacher_quality

    root, low, high, weights = parse(argv)
    with guidance_interval(low, high, Counter()) as calls:
        result = teacher_quality.measure_teacher(root, guidance=weights)
    steps = calls["guided"] + calls["plain"]
    result["interval"] = [low, high]
    result["calls"] = dict(calls)
    # each W samples the same images in the same batches: the NFE per image is 2 per guided step, 1 per plain one
    per_step = (2 * calls["guided"] + calls["plain"]) / steps if steps else 0.0
    result["nfe_per_image"] = per_step * teacher_sampling_steps(root)
    print(json.dumps(result, indent=1))


def teacher_sampling_steps(root: Path) -> int:
    """The steps ``evaluate`` samples the teacher's headline rows with (the model's ``sampling.json``)."""
    return int(json.loads((root / "models" / "ldm" / "sampling.json").read_text())["steps"])


if __name__ == "__main__":
    main(sys.argv[1:])
