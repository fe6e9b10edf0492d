"""3. Hardware use: achieved FLOP/s of the denoiser training step vs a large fp32 matmul in the same run.

FLOPs of forward + backward are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions; the CPU flash-attention kernel has no formula there, so attention is added analytically). The step
time includes the AdamW step. Where the time goes comes from phase timings (forward, backward, optimizer) and one
profiled forward + backward grouped by op kind: the model's own matmuls are compared with the large one (small
matrices), and the rest is attention, normalization and elementwise work. Two extra cases show levers: the same
step on one thread (on a shared machine a busy second core stalls every two-thread op) and ``AdamW(fused=True)``
on the same gradients.
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import interleave, median, speedup, timed
from bench.report import Section
from bench.workloads import LATENT_SHAPE, ldm_batches, ldm_config, ldm_step, synthetic_latents

SIZES = {
    "full": dict(preset="small", batch_size=256, matmul=2048, rounds=5),
    "quick": dict(preset="tiny", batch_size=32, matmul=256, rounds=2),
}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
OP_KINDS = (("attention", ("scaled_dot_product", "softmax")), ("convolution", ("convolution",)),
            ("normalization", ("layer_norm", "group_norm")))


def op_kind(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    return next((kind for kind, keys in OP_KINDS if any(key in name for key in keys)), "elementwise and other")


def attention_flops(step, batch_size: int) -> float:
    """Forward Q K^T and P V (2 L^2 d multiply-adds per head) plus a backward of twice that, for every block."""
    preset = step.module.preset
    tokens = (LATENT_SHAPE[1] // preset.patch_size) * (LATENT_SHAPE[2] // preset.patch_size)
    forward = 4 * batch_size * preset.heads * tokens**2 * preset.head_dim * preset.depth
    return 3.0 * forward


def count_flops(step, batch) -> tuple[float, float]:
    """(all FLOPs, matmul FLOPs) of one forward + backward."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = step.loss(batch, 0, {}, {step.name: step.module})
        loss.backward()
    step.module.zero_grad(set_to_none=True)
    per_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    matmul = sum(flops for op, flops in per_op.items() if op.replace("aten.", "aten::") in MATMUL_OPS)
    return float(counter.get_total_flops()), float(matmul)


def profile_kinds(step, batch) -> dict[str, float]:
    """Self CPU seconds of one forward + backward, summed by op kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        loss, _ = step.loss(batch, 0, {}, {step.name: step.module})
        loss.backward()
    step.module.zero_grad(set_to_none=True)
    kinds: dict[str, float] = {}
    for event in profiler.key_averages():
        kind = op_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return kinds


def step_phases(step, optimizer, fused_optimizer, batch) -> dict[str, float]:
    """Seconds of forward, backward and AdamW step; then the fused AdamW on the same gradients (timed apart)."""
    clock = [time.perf_counter()]
    loss, _ = step.loss(batch, 0, {}, {step.name: step.module})
    clock.append(time.perf_counter())
    loss.backward()
    clock.append(time.perf_counter())
    optimizer.step()
    clock.append(time.perf_counter())
    fused_optimizer.step()
    clock.append(time.perf_counter())
    step.module.zero_grad(set_to_none=True)
    forward, backward, adamw, fused = (b - a for a, b in zip(clock, clock[1:], strict=False))
    return {"forward": forward, "backward": backward, "optimizer": adamw, "fused optimizer": fused,
            "step": forward + backward + adamw}


def threads_label(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}"


def on_threads(threads: int, fn):
    def case():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return case


def phase_rows(phase: dict[str, list[float]], kinds: dict[str, float], matmul_flops: float, peak: float) -> list:
    """Rows for the step's phases and, within forward + backward, for each op kind (profiled shares)."""
    step = median(phase["step"])
    labels = {"forward": "forward", "backward": "backward", "optimizer": "AdamW step (default: for-loop)",
              "fused optimizer": "AdamW(fused=True) step, same grads"}
    rows = [[f"  {label}", median(phase[name]) * 1e3, None, None, 100 * median(phase[name]) / step]
            for name, label in labels.items()]
    forward_backward = median(phase["forward"]) + median(phase["backward"])
    for kind in ("matmul", "attention", "normalization", "convolution", "elementwise and other"):
        seconds = kinds.get(kind, 0.0)
        in_step = seconds / sum(kinds.values()) * forward_backward  # the profiled share of the timed fwd+bwd
        achieved = matmul_flops / seconds if kind == "matmul" and seconds else None  # the model's matmuls only
        rows.append([f"  fwd+bwd: {kind} ops (profiled share)", in_step * 1e3, achieved and achieved / 1e9,
                     achieved and 100 * achieved / peak, 100 * in_step / step])
    return rows


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    config = ldm_config(s["preset"], s["batch_size"])
    split, stats = synthetic_latents(s["batch_size"])
    batch = ldm_batches(split, stats)(torch.arange(s["batch_size"]), "cpu")
    step = ldm_step(config)
    optimizer = torch.optim.AdamW(step.module.parameters(), lr=config.loop.lr)
    fused_optimizer = torch.optim.AdamW(step.module.parameters(), lr=config.loop.lr, fused=True)
    flops, matmul_flops = count_flops(step, batch)
    flops += attention_flops(step, s["batch_size"])
    n = s["matmul"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    threads = torch.get_num_threads()
    other_threads = 1 if threads > 1 else len(os.sched_getaffinity(0))  # the other side of the comparison
    matmul_name = f"matmul {n}x{n} fp32 ({threads_label(threads)}, best of 3)"
    other = f"training step, {threads_label(other_threads)}"

    cases = {"step": lambda: step_phases(step, optimizer, fused_optimizer, batch),
             matmul_name: lambda: min(timed(lambda: a @ b)() for _ in range(3))}
    if other_threads != threads:
        cases[other] = on_threads(other_threads, cases["step"])
    cases["step"]()  # warm-up: allocates the optimizer states
    results = interleave(cases, s["rounds"])
    kinds = profile_kinds(step, batch)

    matmul_seconds = results[matmul_name]
    peak = 2.0 * n**3 / median(matmul_seconds)
    phase = {name: [r[name] for r in results["step"]] for name in results["step"][0]}
    rate = flops / median(phase["step"])
    rows = [[matmul_name, median(matmul_seconds) * 1e3, peak / 1e9, 100.0, None],
            [f"training step, fwd+bwd+AdamW ({threads_label(threads)})", median(phase["step"]) * 1e3, rate / 1e9,
             100 * rate / peak, 100.0]]
    rows += phase_rows(phase, kinds, matmul_flops, peak)
    section = Section(
        "hardware_use", f"Hardware use: train_ldm '{s['preset']}' DiT training step, batch {s['batch_size']} "
        f"({flops / 1e9:.3g} GFLOP fwd+bwd)", s["rounds"], ["case", "ms", "GFLOP/s", "% of big matmul", "% of step"],
        rows)
    section.ratios["step FLOP/s / big matmul FLOP/s"] = speedup(phase["step"], matmul_seconds) * flops / (2.0 * n**3)
    section.ratios["fused AdamW / default AdamW (speed)"] = speedup(phase["fused optimizer"], phase["optimizer"])
    if other_threads != threads:
        seconds = [r["step"] for r in results[other]]
        rows.append([other, median(seconds) * 1e3, flops / median(seconds) / 1e9,
                     100 * flops / median(seconds) / peak, 100 * median(seconds) / median(phase["step"])])
        section.ratios[f"{threads_label(other_threads)} / {threads_label(threads)} (step speed)"] = speedup(
            seconds, phase["step"])
    section.notes.append("profiled rows: each op kind's share of self CPU time in one profiled forward + backward, "
                         "applied to the timed fwd+bwd; matmul GFLOP/s = counted matmul FLOPs / their profiled time")
    section.notes.append(f"attention FLOPs added analytically: {attention_flops(step, s['batch_size']) / 1e9:.3g} G")
    return section.finish(results)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
