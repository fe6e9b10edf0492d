"""7. Convolution layout: the demo autoencoder's training step (train_vae's real losses: reconstruction, KL,
perceptual features and the patch GAN with its adaptive weight, then the discriminator step) with the weights and
activations in PyTorch's default layout (the training loop's default) vs channels-last (``channels_last: true``).

Same initial weights, same batch, fused AdamW in both; each round times a few steady-state steps of each case.
"""

from __future__ import annotations

import copy
import time

import torch

from bench.measure import interleave, median, speedup, spread
from bench.report import Section
from bench.workloads import steady_seconds
from gmpipe.config.data import DataConfig
from gmpipe.config.train_vae import TrainVAEConfig

SIZES = {
    "full": dict(batch_size=32, warmup=2, measured=5, rounds=4),
    "quick": dict(batch_size=2, warmup=1, measured=1, rounds=1),
}


def autoencoder_training(channels_last: bool):
    """A closure running one train_vae step (autoencoder, then discriminator) on a fixed batch; the modules are
    built once from the demo's section with the discriminator switched on from step 0."""
    from gmpipe.vae.training import build_loss, build_models, loss_steps

    torch.manual_seed(0)
    data, config = DataConfig(), TrainVAEConfig(disc_start=0)
    vae, discriminator = build_models(data, config)
    steps = loss_steps(vae, discriminator, build_loss(config), config)
    modules = {s.name: s.module for s in steps}
    if channels_last:
        for module in modules.values():
            module.to(memory_format=torch.channels_last)
    optimizers = {s.name: torch.optim.AdamW(s.module.parameters(), lr=1e-4, fused=True) for s in steps}
    return steps, modules, optimizers, data


def seconds_per_step(state, batch: torch.Tensor, warmup: int, measured: int) -> float:
    steps, modules, optimizers, _ = state
    stamps = []
    for index in range(warmup + measured + 1):
        stamps.append(time.perf_counter())
        context = {}
        for s in steps:
            loss, _ = s.loss(batch, 1000 + index, context, modules)
            loss.backward()
            optimizers[s.name].step()
            optimizers[s.name].zero_grad(set_to_none=True)
    return steady_seconds(stamps, warmup)


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    default, fast = autoencoder_training(False), autoencoder_training(True)
    fast[0][0].module.load_state_dict(copy.deepcopy(default[0][0].module.state_dict()))
    data = default[3]
    batch = torch.rand(s["batch_size"], data.channels, data.image_size, data.image_size,
                       generator=torch.Generator().manual_seed(1)) * 2 - 1
    seconds = interleave({
        "default layout (NCHW)": lambda: seconds_per_step(default, batch, s["warmup"], s["measured"]),
        "channels-last": lambda: seconds_per_step(fast, batch, s["warmup"], s["measured"]),
    }, s["rounds"])
    baseline = seconds["default layout (NCHW)"]
    rows = [[name, median(t) * 1000, spread([1000 * v for v in t]), speedup(t, baseline)]
            for name, t in seconds.items()]
    section = Section("conv_layout", f"Convolution layout: train_vae step, demo autoencoder + patch GAN, batch "
                      f"{s['batch_size']}, {torch.get_num_threads()} thread(s)", s["rounds"],
                      ["case", "ms/step", "ms/step range", "speed vs NCHW"], rows)
    section.ratios["channels-last / NCHW speed"] = speedup(seconds["channels-last"], baseline)
    section.notes.append("the loop's default is channels_last: false; a ratio above 1 here says to turn it on")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
