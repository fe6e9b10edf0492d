"""1. Trainer overhead: steps/s of the shared loop (``gmpipe.train.loop.train``) vs a bare PyTorch loop.

Same model (train_ldm's class-conditional DiT, same initial weights), same loss (``denoising_step``), same batch
size, AdamW with the same hyperparameters and the same implementation (``fused=True``, as the loop uses on CPU and
CUDA, so the baseline is not handicapped by the slower for-loop AdamW), the same memory layout (the loop's
``channels_last``). A third case adds to the bare loop what the shared loop also does (gradient clipping and the EMA
update) to separate the cost of that work from the cost of the loop machinery (accelerate wrapping, batch indices,
LR scheduler, loss bookkeeping, progress bar). Target: loop >= 0.95x bare.
"""

from __future__ import annotations

import copy

from bench.measure import interleave, median, speedup, spread
from bench.report import Section
from bench.workloads import (
    bare_seconds_per_step,
    ldm_batches,
    ldm_config,
    ldm_step,
    loop_seconds_per_step,
    synthetic_latents,
)

SIZES = {
    # 57,000 items: the Fashion-MNIST train split after the 5% validation share (batch_indices permutes them)
    "full": dict(preset="small", batch_size=256, items=57_000, warmup=2, measured=8, rounds=8),
    "quick": dict(preset="tiny", batch_size=32, items=512, warmup=1, measured=3, rounds=2),
}
TARGET = 0.95


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    config = ldm_config(s["preset"], s["batch_size"])
    split, stats = synthetic_latents(s["items"])
    make_batch = ldm_batches(split, stats)
    loop_step = ldm_step(config)
    bare_step, full_bare_step = copy.deepcopy(loop_step), copy.deepcopy(loop_step)
    warmup, measured = s["warmup"], s["measured"]

    seconds = interleave({
        "gmpipe loop": lambda: loop_seconds_per_step(config, loop_step, len(split), make_batch, warmup, measured),
        "bare fused AdamW": lambda: bare_seconds_per_step(config, bare_step, len(split), make_batch, warmup,
                                                          measured),
        "bare fused AdamW + clip + EMA": lambda: bare_seconds_per_step(
            config, full_bare_step, len(split), make_batch, warmup, measured, clip_and_ema=True),
    }, s["rounds"])

    baseline = seconds["bare fused AdamW"]
    rows = [[name, 1 / median(t), median(t) * 1000, spread([1000 * v for v in t]), speedup(t, baseline)]
            for name, t in seconds.items()]
    section = Section(
        "trainer_overhead",
        f"Trainer overhead: train_ldm '{s['preset']}' DiT, batch {s['batch_size']}, 4x8x8 latents",
        s["rounds"], ["case", "steps/s", "ms/step", "ms/step range", "speed vs bare"], rows)
    ratio = speedup(seconds["gmpipe loop"], baseline)
    section.ratios["loop / bare"] = ratio
    with_extras = seconds["bare fused AdamW + clip + EMA"]
    section.ratios["loop / (bare + clip + EMA)"] = speedup(seconds["gmpipe loop"], with_extras)
    section.target(f"loop / bare >= {TARGET}", ratio, ratio >= TARGET)
    section.ratios["loop / bare, best rounds"] = min(baseline) / min(seconds["gmpipe loop"])  # noise only adds time
    machinery = median(seconds["gmpipe loop"]) - median(with_extras)
    section.notes.append(f"loop machinery beyond the same work in a bare loop: {machinery * 1e3:.2f} ms/step")
    loop = config.loop
    section.notes.append(f"steady state: median step of {measured} per round after {warmup} warm-up steps; "
                         f"log_every={loop.log_every}, checkpoint_every={loop.checkpoint_every} (defaults)")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
