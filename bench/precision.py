"""Precision on this machine: bfloat16 autocast against float32 for the demo's heaviest workloads, and what
``auto`` (``gmpipe.precision.fast_bf16``) picks here.

On a CPU with bfloat16 units (AMX or AVX512-BF16) autocast runs oneDNN's bf16 kernels; without them it runs emulated
ones, and ``auto`` falls back to float32. Cases, each on the same weights and batch in both precisions, interleaved:
the train_vae step (``bench.conv_layout``'s: real losses, patch GAN on), the train_ldm step (the demo's ``small``
DiT, fused AdamW) and, without gradients, a denoiser evaluation of a sampling batch and the autoencoder encoding a
cache_latents batch.
"""

from __future__ import annotations

import time

import torch

from bench.measure import interleave, median, speedup, spread
from bench.report import Section
from bench.workloads import ldm_batches, ldm_config, ldm_step, steady_seconds, synthetic_latents
from gmpipe.precision import bf16_autocast, fast_bf16

SIZES = {
    "full": dict(vae_batch=32, ldm_batch=256, sample_batch=250, encode_batch=256, warmup=1, measured=3, rounds=2),
    "quick": dict(vae_batch=2, ldm_batch=8, sample_batch=8, encode_batch=8, warmup=1, measured=1, rounds=1),
}


def vae_training(batch_size: int):
    from bench.conv_layout import autoencoder_training, seconds_per_step

    state = autoencoder_training(False)
    batch = torch.rand(batch_size, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return lambda warmup, measured: seconds_per_step(state, batch, warmup, measured)


def ldm_training(batch_size: int):
    torch.manual_seed(0)
    config = ldm_config("small", batch_size)
    step = ldm_step(config)
    optimizer = torch.optim.AdamW(step.module.parameters(), lr=1e-4, fused=True)
    split, stats = synthetic_latents(batch_size)
    batch = ldm_batches(split, stats)(torch.arange(batch_size), "cpu")

    def train_step(index: int) -> None:
        loss, _ = step.loss(batch, index, {}, {step.name: step.module})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return per_call(train_step, grad=True)


def per_call(fn, grad: bool = False):
    """Seconds per call of ``fn(index)``, the median of ``measured`` calls after ``warmup`` (gradients only with
    ``grad``)."""
    def seconds(warmup: int, measured: int) -> float:
        stamps = []
        with torch.set_grad_enabled(grad):
            for index in range(warmup + measured + 1):
                stamps.append(time.perf_counter())
                fn(index)
        return steady_seconds(stamps, warmup)

    return seconds


def denoiser_evaluation(batch_size: int):
    from bench.workloads import CONDITIONING, LATENT_SHAPE

    torch.manual_seed(0)
    denoiser = CONDITIONING.make_denoiser(LATENT_SHAPE, "small").eval()
    x = torch.randn(batch_size, *LATENT_SHAPE)
    t = torch.rand(batch_size)
    labels = torch.randint(10, (batch_size,))
    return per_call(lambda index: denoiser(x, t, labels))


def encoding(batch_size: int):
    from bench.workloads import demo_autoencoder

    torch.manual_seed(0)
    vae = demo_autoencoder()
    images = torch.rand(batch_size, 1, 32, 32) * 2 - 1
    return per_call(lambda index: vae.encode(images).latent_dist.mean)


def in_precision(seconds, bf16: bool, warmup: int, measured: int):
    def run() -> float:
        with bf16_autocast("cpu", bf16):
            return seconds(warmup, measured)
    return run


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    workloads = {
        f"train_vae step (batch {s['vae_batch']})": vae_training(s["vae_batch"]),
        f"train_ldm step (small DiT, batch {s['ldm_batch']})": ldm_training(s["ldm_batch"]),
        f"denoiser evaluation (batch {s['sample_batch']}, no grad)": denoiser_evaluation(s["sample_batch"]),
        f"autoencoder encoding (batch {s['encode_batch']}, no grad)": encoding(s["encode_batch"]),
    }
    cases = {f"{name}: {label}": in_precision(fn, label == "bf16", s["warmup"], s["measured"])
             for name, fn in workloads.items() for label in ("fp32", "bf16")}
    seconds = interleave(cases, s["rounds"])
    rows = []
    fast = fast_bf16("cpu")
    section = Section("precision", f"bf16 autocast vs float32 on this CPU ({torch.get_num_threads()} thread(s); "
                      f"bfloat16 units: {'yes' if fast else 'no'}, so auto picks {'bf16' if fast else 'fp32'})",
                      s["rounds"], ["workload", "fp32 ms", "bf16 ms", "bf16 ms range", "bf16 speed vs fp32"], rows)
    for name in workloads:
        exact, half = seconds[f"{name}: fp32"], seconds[f"{name}: bf16"]
        ratio = speedup(half, exact)
        rows.append([name, median(exact) * 1000, median(half) * 1000, spread([1000 * v for v in half]), ratio])
        section.ratios[f"bf16 / fp32 speed, {name.split(' (')[0]}"] = ratio
    section.notes.append("a ratio below 1 is bf16 running slower than float32: auto picks float32 on such a CPU")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
