"""8. Scale plan: what one optimizer step of each training stage costs, at the demo's params (``params.yaml``).

For each stage's real LossSteps (the modules and losses the stage builds, random weights and a synthetic batch of
the demo's shapes): FLOPs of forward + backward counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions; attention is counted where its kernel has a formula, so transformer FLOPs are a lower bound), the
trainable parameters, the bytes of weights + gradients + AdamW state + EMA (fp32), the bytes of the batch read from
the data pipeline, and the measured seconds per step of this run (steady state, a few steps after one warm-up).
From them: achieved FLOP/s on this CPU, and the time of one pass over the 57,000 training images at a GPU's peak
FLOP/s times the same utilisation fraction (MFU) the stage reached on this CPU of the CPU's own peak (a large fp32
matmul measured in the same run), on one and on eight GPUs (data parallel, the batch split evenly), and the input
rate the data pipeline would then have to sustain. README "Scale plan" reads this table. Small models rarely reach
a GPU's utilisation (a step is a few hundred kernel launches), so the GPU times are lower bounds.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import median
from bench.report import REPO, Section
from bench.workloads import LATENT_SHAPE, NUM_CLASSES, ldm_batches, ldm_step, synthetic_images, synthetic_latents

TRAIN_ITEMS = 57_000  # the demo's Fashion-MNIST train split after the validation share
GPU = ("A100", 312e12)  # bf16 dense peak FLOP/s
SIZES = {"full": dict(measured=3, scale=1.0, matmul=2048), "quick": dict(measured=1, scale=0.125, matmul=256)}


def _demo_params():
    from gmpipe.config.params import load_params

    return load_params(REPO / "params.yaml")


def _batch(size: int, scale: float) -> int:
    return max(2, int(size * scale))


def vae_steps(params, scale):
    from gmpipe.pixels import uint8_to_signed
    from gmpipe.vae.training import build_loss, build_models, loss_steps

    config = params.train_vae.model_copy(update={"disc_start": 0})
    vae, discriminator = build_models(params.data, config)
    batch = uint8_to_signed(synthetic_images(_batch(config.loop.batch_size, scale)))
    return loss_steps(vae, discriminator, build_loss(config), config), batch, config.loop, 1000


def ldm_steps(params, scale):
    config = params.train_ldm
    if scale != 1:
        raw = config.model_dump()
        raw["batch_size"] = _batch(config.loop.batch_size, scale)
        config = type(config).model_validate(raw)
    split, stats = synthetic_latents(config.loop.batch_size)
    batch = ldm_batches(split, stats)(torch.arange(config.loop.batch_size), "cpu")
    return [ldm_step(config)], batch, config.loop, 0


def ar_steps(params, scale):
    from gmpipe.ar.likelihood import ar_loss_step
    from gmpipe.ar.model import LatentAR

    config = params.train_ar
    length = LATENT_SHAPE[0] * LATENT_SHAPE[1] * LATENT_SHAPE[2]
    model = LatentAR(config.bins, NUM_CLASSES, length, config.preset, config.dropout)
    size = _batch(config.loop.batch_size, scale)
    batch = torch.randint(config.bins, (size, length)), torch.randint(NUM_CLASSES, (size,))
    return [ar_loss_step(model, config.p_uncond)], batch, config.loop, 0


def gan_steps(params, scale):
    from gmpipe.gan.loop_losses import gan_loss_steps
    from gmpipe.gan.networks import build_networks

    config = params.train_gan
    generator, discriminator = build_networks(config, LATENT_SHAPE, NUM_CLASSES)
    size = _batch(config.loop.batch_size, scale)
    batch = torch.randn(size, *LATENT_SHAPE), torch.randint(NUM_CLASSES, (size,))
    steps = gan_loss_steps(generator, discriminator, config.loss, r1_gamma=config.r1_gamma,
                           r1_every=config.r1_every)
    return steps, batch, config.loop, 1  # a step without the lazy R1 term (every r1_every steps)


STAGES = {"train_vae": vae_steps, "train_ldm": ldm_steps, "train_ar": ar_steps, "train_gan": gan_steps}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_step(steps, batch, step_index: int) -> None:
    """Forward + backward of every LossStep in order (the loop's order, sharing one context), then AdamW."""
    context, modules = {}, {s.name: s.module for s in steps}
    for s in steps:
        loss, _ = s.loss(batch, step_index, context, modules)
        if loss is None:
            continue
        loss.backward()
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)


def measure_stage(name: str, build, params, size: dict) -> list:
    torch.manual_seed(0)
    steps, batch, loop, step_index = build(params, size["scale"])
    for s in steps:
        s.optimizer = torch.optim.AdamW(s.module.parameters(), lr=1e-4, fused=True)
    with FlopCounterMode(display=False) as counter:
        one_step(steps, batch, step_index)
    flops = float(counter.get_total_flops())
    times = []
    for _ in range(size["measured"]):
        start = time.perf_counter()
        one_step(steps, batch, step_index)
        times.append(time.perf_counter() - start)
    parameters = [p for s in steps for p in s.module.parameters() if p.requires_grad]
    weights = _nbytes(parameters)
    ema = weights if loop.ema_decay > 0 else 0  # the EMA copy of the module the stage keeps (at most all of it)
    state_bytes = 4 * weights + ema  # weights, gradients, AdamW m and v (fp32), EMA
    inputs = batch if isinstance(batch, tuple | list) else (batch,)
    batch_size = len(inputs[0])
    seconds = median(times)
    return [name, batch_size, flops / 1e9, sum(p.numel() for p in parameters) / 1e6, state_bytes / 2**20,
            _nbytes(inputs) / 2**10, seconds * 1000, flops / seconds / 1e9]


def matmul_flops_per_second(n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / median(times)


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    params = _demo_params()
    rows = [measure_stage(name, build, params, s) for name, build in STAGES.items()]
    peak = matmul_flops_per_second(s["matmul"])
    section = Section("scale_plan", f"Scale plan: one optimizer step per training stage at the demo's params "
                      f"({torch.get_num_threads()} thread(s){'' if s['scale'] == 1 else ', batches scaled down'})",
                      s["measured"], ["stage", "batch", "GFLOP/step", "M params", "state MiB", "batch KiB",
                                      "ms/step (CPU)", "GFLOP/s (CPU)"], rows)
    section.notes.append(f"CPU peak (fp32 {s['matmul']}^2 matmul, same threads): {peak / 1e9:.1f} GFLOP/s")
    gpu, gpu_peak = GPU
    for row in rows:
        name, batch, gflop, batch_kib, cpu_rate = row[0], row[1], row[2], row[5], row[7] * 1e9
        mfu = cpu_rate / peak
        steps_per_epoch = TRAIN_ITEMS / batch
        epoch_cpu = steps_per_epoch * row[6] / 1000
        gpu_step = gflop * 1e9 / (mfu * gpu_peak)
        section.ratios[f"{name}: CPU MFU"] = mfu
        section.notes.append(
            f"{name}: one epoch = {steps_per_epoch:.0f} steps, {gflop * steps_per_epoch / 1e3:.1f} TFLOP, "
            f"{epoch_cpu / 60:.1f} min here; on one {gpu} at the same MFU ({mfu:.0%}) {steps_per_epoch * gpu_step:.1f} "
            f"s ({gpu_step * 1e3:.2f} ms/step, input {batch_kib / 2**10 / gpu_step:.0f} MiB/s), on eight "
            f"{steps_per_epoch * gpu_step / 8:.2f} s")
    return section.finish({row[0]: [row[6] / 1000] for row in rows})


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
