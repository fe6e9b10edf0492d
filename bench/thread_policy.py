"""9. Threads beside other work: the demo's train_vae step (``bench.conv_layout``'s: real losses, discriminator on,
batch 32; in float32, as in every run of this section) under each OpenMP wait policy and on one thread, alone and
beside other work.

How OpenMP worker threads wait between parallel regions is fixed when torch loads its OpenMP runtime (libgomp), so
every case runs in a new process whose environment sets ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` (absent for
libgomp's own default: a short spin, then sleep) and ``GOMP_SPINCOUNT`` (gmpipe's bounded spin, or absent); the worker
imports torch before gmpipe, whose own default (``gmpipe/__init__.py``) would otherwise apply. Each case runs alone,
beside a busy one-thread Python process (any other job), and beside a copy of itself started at the same moment (a
second training job with the same settings); a row gives the median seconds per step of that process (the mean of
the two copies' medians beside a copy).

The question it answers: which default to ship. A setting that is fast alone but many times slower beside other
work is the collapse the threads default must avoid; one thread cannot collapse that way but leaves a core idle
when the machine is quiet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.report import REPO, Section

SIZES = {
    "full": dict(batch_size=32, warmup=2, measured=8),
    "quick": dict(batch_size=2, warmup=1, measured=1),
}
CORES = len(os.sched_getaffinity(0))
# gmpipe's GOMP_SPINCOUNT (gmpipe/__init__.py), written out: importing gmpipe here would set the policy of the worker
# processes that run this module, before their torch loads (tests/test_threads.py checks that the two agree).
SPIN_COUNT = "100000000"
SPINNING = f"{CORES} threads, spinning (gmpipe's default)"
# name -> environment of the worker (None: the variable is removed)
SETTINGS = {
    SPINNING: {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": SPIN_COUNT},
    f"{CORES} threads, spinning unbounded (ACTIVE)": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "ACTIVE",
                                                      "GOMP_SPINCOUNT": None},
    f"{CORES} threads, libgomp default": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": None,
                                          "GOMP_SPINCOUNT": None},
    f"{CORES} threads, sleeping (PASSIVE)": {"OMP_NUM_THREADS": str(CORES), "OMP_WAIT_POLICY": "PASSIVE",
                                             "GOMP_SPINCOUNT": None},
    "1 thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
}
QUICK_SETTINGS = (SPINNING, "1 thread")
CONDITIONS = ("alone", "beside a busy process", "beside a copy of itself")
QUICK_CONDITIONS = CONDITIONS[:2]
BUSY = [sys.executable, "-c", "while True: pass"]


def worker(batch_size: int, warmup: int, measured: int) -> float:
    """Median seconds of one train_vae step, in this process's OpenMP settings."""
    import torch  # first: torch's OpenMP runtime reads the wait policy this process was started with

    from bench.conv_layout import autoencoder_training, seconds_per_step

    state = autoencoder_training(channels_last=False)
    data = state[3]
    batch = torch.rand(batch_size, data.channels, data.image_size, data.image_size,
                       generator=torch.Generator().manual_seed(1)) * 2 - 1
    return seconds_per_step(state, batch, warmup, measured)


def _environment(setting: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in setting.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _start(setting: dict, size: dict) -> subprocess.Popen:
    args = [str(size[k]) for k in ("batch_size", "warmup", "measured")]
    return subprocess.Popen([sys.executable, "-m", "bench.thread_policy", "--worker", *args], cwd=REPO,
                            env=_environment(setting), stdout=subprocess.PIPE, text=True)


def _seconds(process: subprocess.Popen) -> float:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"thread_policy worker exited with code {process.returncode}")
    return float(json.loads(out.strip().splitlines()[-1])["seconds_per_step"])


def measure(setting: dict, condition: str, size: dict) -> float:
    """Median seconds per step of the worker in ``condition`` (beside a copy: the mean of the two)."""
    if condition == "beside a copy of itself":
        pair = [_start(setting, size), _start(setting, size)]
        return sum(_seconds(p) for p in pair) / 2
    busy = subprocess.Popen(BUSY) if condition == "beside a busy process" else None
    try:
        return _seconds(_start(setting, size))
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    names, conditions = (list(SETTINGS), CONDITIONS) if size == "full" else (QUICK_SETTINGS, QUICK_CONDITIONS)
    seconds = {name: {condition: measure(SETTINGS[name], condition, s) for condition in conditions}
               for name in names}
    best_alone = min(seconds[name]["alone"] for name in names)
    rows = [[name, *(1000 * seconds[name][c] for c in conditions),
             max(seconds[name][c] for c in conditions) / seconds[name]["alone"],
             best_alone / seconds[name]["alone"]] for name in names]
    section = Section("thread_policy", f"Threads beside other work: train_vae step, batch {s['batch_size']}, "
                      f"{CORES} cores", 1,
                      ["setting", *(f"ms/step {c}" for c in conditions), "worst / alone", "speed alone vs best"],
                      rows)
    for condition in conditions:
        section.ratios[f"{CORES} threads spinning / 1 thread speed, {condition}"] = (
            seconds["1 thread"][condition] / seconds[SPINNING][condition])
    if size == "full":
        sleeping = f"{CORES} threads, sleeping (PASSIVE)"
        section.ratios["spinning / sleeping speed, alone"] = seconds[sleeping]["alone"] / seconds[SPINNING]["alone"]
    section.notes.append(f"{s['warmup']} warm-up and {s['measured']} measured steps per process; gmpipe's default "
                         f"is OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT={SPIN_COUNT} and torch's threads "
                         "(compute.threads: null)")
    return section.finish(seconds)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        batch_size, warmup, measured = (int(v) for v in sys.argv[2:5])
        print(json.dumps({"seconds_per_step": worker(batch_size, warmup, measured)}))
    else:
        from bench.command import section_main

        section_main(run)
