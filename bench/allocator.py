"""Allocator: glibc's malloc as gmpipe tunes it (``gmpipe.keep_freed_memory``: freed blocks stay in the process)
against glibc's own behaviour (``GMPIPE_ALLOCATOR=system``), on the demo's steps.

The setting is made when gmpipe is imported, so every case runs in a new process, the two settings alternating
(``rounds`` pairs). Workloads, in bf16 autocast where ``auto`` picks it (as the stages run): the train_vae step
(``bench.conv_layout``'s), the train_ldm step (``bench.precision``'s: the ``small`` DiT, fused AdamW) and the DiT's
forward pass on a guided sampling batch (evaluate's batch of 300, doubled by classifier-free guidance). A row gives
the median seconds per step and the minor page faults per step (every page of memory the kernel hands the process
afresh is one fault).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.measure import median, spread
from bench.report import REPO, Section

SIZES = {
    "full": dict(vae_batch=32, ldm_batch=256, sample_batch=600, warmup=2, measured=10, rounds=2),
    "quick": dict(vae_batch=2, ldm_batch=8, sample_batch=8, warmup=1, measured=2, rounds=1),
}
WORKLOADS = ("train_vae step", "train_ldm step", "DiT sampling forward")
SETTINGS = {"tuned (gmpipe's default)": None, "glibc's own (GMPIPE_ALLOCATOR=system)": "system"}


def worker(workload: str, size: dict) -> dict:
    """Median seconds and minor page faults per step of ``workload`` in this process."""
    import resource

    import gmpipe
    from bench.precision import denoiser_evaluation, in_precision, ldm_training, vae_training
    from gmpipe.precision import fast_bf16

    make = {"train_vae step": lambda: vae_training(size["vae_batch"]),
            "train_ldm step": lambda: ldm_training(size["ldm_batch"]),
            "DiT sampling forward": lambda: denoiser_evaluation(size["sample_batch"])}[workload]
    workload_seconds = make()
    in_precision(workload_seconds, fast_bf16("cpu"), size["warmup"], 1)()  # first touches and one-off set-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    per_step = in_precision(workload_seconds, fast_bf16("cpu"), 0, size["measured"])()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"seconds": per_step, "faults": faults / (size["measured"] + 1), "tuned": gmpipe.ALLOCATOR_TUNED}


def measure(workload: str, setting: str | None, size: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "GMPIPE_ALLOCATOR"}
    if setting is not None:
        env["GMPIPE_ALLOCATOR"] = setting
    result = subprocess.run([sys.executable, "-m", "bench.allocator", "--worker", workload, size], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"allocator worker ({workload}) exited with code {result.returncode}: "
                           f"{result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    samples: dict[str, list[dict]] = {f"{w}: {name}": [] for w in WORKLOADS for name in SETTINGS}
    for round_index in range(s["rounds"]):
        order = list(SETTINGS) if round_index % 2 == 0 else list(SETTINGS)[::-1]
        for workload in WORKLOADS:
            for name in order:
                samples[f"{workload}: {name}"].append(measure(workload, SETTINGS[name], size))
    tuned, system = SETTINGS
    rows = []
    section = Section("allocator", "glibc malloc tuned by gmpipe vs glibc's own behaviour (a new process per case)",
                      s["rounds"], ["workload", "allocator", "ms/step", "ms range", "page faults/step", "applied"],
                      rows)
    for workload in WORKLOADS:
        for name in SETTINGS:
            runs = samples[f"{workload}: {name}"]
            ms = [1000 * r["seconds"] for r in runs]
            rows.append([workload, name, median(ms), spread(ms), median([r["faults"] for r in runs]),
                         all(r["tuned"] == (SETTINGS[name] is None) for r in runs)])
        pairs = zip(samples[f"{workload}: {tuned}"], samples[f"{workload}: {system}"], strict=True)
        section.ratios[f"tuned / glibc's own speed, {workload}"] = median([b["seconds"] / a["seconds"]
                                                                           for a, b in pairs])
    section.notes.append(f"{s['warmup']} warm-up and {s['measured']} measured steps per process; 'applied': whether "
                         "gmpipe's setting was in force in every process of the row (it is not on another C library)")
    return section.finish(samples)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], SIZES[sys.argv[3]])))
    else:
        from bench.command import section_main

        section_main(run)
