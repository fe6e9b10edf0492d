"""7. Convolution layout: the demo autoencoder's training step (train_vae's real losses: reconstruction, KL,
perceptual features and the patch GAN with its adaptive weight, then the discriminator step) with the weights and
activations in PyTorch's default layout (the training loop's default) vs channels-last (``channels_last: true``), and
vs the default layout as diffusers alone leaves it: its mid-block attention hands back a channels-last view, which
the rest of the autoencoder inherits (gmpipe copies it back, ``gmpipe.nn.autoencoder``). Then the latent GAN's
step (train_gan's generator and discriminator losses with R1, the demo's ``small`` preset) in both layouts: the
demo trains it channels-last.

Same initial weights, same batch, fused AdamW in every case, under bf16 autocast where the CPU computes bf16 (as the
stages train on it), else float32; each round times a few steady-state steps of each case.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from bench.measure import interleave, median, speedup, spread
from bench.report import Section
from bench.workloads import steady_seconds
from gmpipe.config.data import DataConfig
from gmpipe.config.train_vae import TrainVAEConfig
from gmpipe.nn.autoencoder import _default_layout
from gmpipe.precision import fast_bf16

SIZES = {
    "full": dict(batch_size=32, gan_batch_size=128, warmup=2, measured=5, gan_measured=8, rounds=4),
    "quick": dict(batch_size=2, gan_batch_size=4, warmup=1, measured=1, gan_measured=4, rounds=1),
}


def autoencoder_training(channels_last: bool, attention_layout_fix: bool = True):
    """A closure running one train_vae step (autoencoder, then discriminator) on a fixed batch; the modules are
    built once from the demo's section with the discriminator switched on from step 0. ``attention_layout_fix``
    False: the autoencoder as diffusers alone builds it (no copy back to the default layout after its attention)."""
    from gmpipe.vae.training import build_loss, build_models, loss_steps

    torch.manual_seed(0)
    data, config = DataConfig(), TrainVAEConfig(disc_start=0)
    vae, discriminator = build_models(data, config)
    if not attention_layout_fix:
        for module in vae.modules():
            for key, hook in list(module._forward_hooks.items()):
                if hook is _default_layout:
                    del module._forward_hooks[key]
    steps = loss_steps(vae, discriminator, build_loss(config), config)
    modules = {s.name: s.module for s in steps}
    if channels_last:
        for module in modules.values():
            module.to(memory_format=torch.channels_last)
    optimizers = {s.name: torch.optim.AdamW(s.module.parameters(), lr=1e-4, fused=True) for s in steps}
    return steps, modules, optimizers, data


def gan_training(channels_last: bool):
    """The same for one train_gan step (generator, then discriminator with R1 at its interval) on the demo's latent
    shape and preset; returns (state, batch)."""
    from gmpipe.config.train_gan import TrainGANConfig
    from gmpipe.gan.loop_losses import gan_loss_steps
    from gmpipe.gan.networks import build_networks

    torch.manual_seed(0)
    config = TrainGANConfig(loss="hinge")  # the demo's loss
    generator, discriminator = build_networks(config, (4, 8, 8), 10)
    steps = gan_loss_steps(generator, discriminator, config.loss, r1_gamma=config.r1_gamma, r1_every=config.r1_every,
                           d_lr=config.d_lr)
    modules = {s.name: s.module for s in steps}
    if channels_last:
        for module in modules.values():
            module.to(memory_format=torch.channels_last)
    optimizers = {s.name: torch.optim.AdamW(s.module.parameters(), lr=2e-4, betas=(0.0, 0.99), fused=True)
                  for s in steps}
    return steps, modules, optimizers, None


def seconds_per_step(state, batch, warmup: int, measured: int, bf16: bool = False, mean: bool = False) -> float:
    """Steady-state seconds per step (the median; ``mean``: the mean, for steps that differ by design, like the GAN's
    R1 step every ``r1_every``)."""
    steps, modules, optimizers, _ = state
    stamps = []
    for index in range(warmup + measured + 1):
        stamps.append(time.perf_counter())
        context = {}
        for s in steps:
            # bf16: under autocast here; otherwise whatever precision the caller runs in (bench.precision wraps it)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss, _ = s.loss(batch, 1000 + index, context, modules)
            loss.backward()
            optimizers[s.name].step()
            optimizers[s.name].zero_grad(set_to_none=True)
    if mean:
        return (stamps[-1] - stamps[warmup]) / measured
    return steady_seconds(stamps, warmup)


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    bf16 = fast_bf16("cpu")
    default, fast, diffusers_alone = (autoencoder_training(False), autoencoder_training(True),
                                      autoencoder_training(False, attention_layout_fix=False))
    for other in (fast, diffusers_alone):
        other[0][0].module.load_state_dict(copy.deepcopy(default[0][0].module.state_dict()))
    data = default[3]
    batch = torch.rand(s["batch_size"], data.channels, data.image_size, data.image_size,
                       generator=torch.Generator().manual_seed(1)) * 2 - 1
    gan, gan_fast = gan_training(False), gan_training(True)
    gan_fast[1]["generator"].load_state_dict(gan[1]["generator"].state_dict())
    gan_fast[1]["discriminator"].load_state_dict(gan[1]["discriminator"].state_dict())
    generator = torch.Generator().manual_seed(2)
    latents = (torch.randn(s["gan_batch_size"], 4, 8, 8, generator=generator),
               torch.randint(0, 10, (s["gan_batch_size"],), generator=generator))
    step = lambda state, inputs: lambda: seconds_per_step(state, inputs, s["warmup"], s["measured"], bf16)  # noqa: E731
    # the GAN: the mean over a whole number of R1 intervals (its R1 step costs a second backward)
    gan_step = lambda state: lambda: seconds_per_step(state, latents, s["warmup"], s["gan_measured"], bf16,  # noqa: E731
                                                      mean=True)
    seconds = interleave({
        "train_vae, default layout (NCHW)": step(default, batch),
        "train_vae, channels-last": step(fast, batch),
        "train_vae, NCHW as diffusers leaves it after the attention": step(diffusers_alone, batch),
        "train_gan, default layout (NCHW)": gan_step(gan),
        "train_gan, channels-last": gan_step(gan_fast),
    }, s["rounds"])
    rows = []
    for name, t in seconds.items():
        baseline = seconds[name.split(",")[0] + ", default layout (NCHW)"]
        rows.append([name, median(t) * 1000, spread([1000 * v for v in t]), speedup(t, baseline)])
    section = Section("conv_layout", f"Convolution layout: train_vae step (demo autoencoder + patch GAN, batch "
                      f"{s['batch_size']}), train_gan step (batch {s['gan_batch_size']}), "
                      f"{'bf16' if bf16 else 'float32'}, {torch.get_num_threads()} thread(s)", s["rounds"],
                      ["case", "ms/step", "ms/step range", "speed vs NCHW"], rows)
    vae, gan_seconds = seconds["train_vae, default layout (NCHW)"], seconds["train_gan, default layout (NCHW)"]
    section.ratios["channels-last / NCHW speed"] = speedup(seconds["train_vae, channels-last"], vae)
    section.ratios["train_vae: attention output in NCHW / as diffusers leaves it, speed"] = speedup(
        vae, seconds["train_vae, NCHW as diffusers leaves it after the attention"])
    section.ratios["train_gan: channels-last / NCHW speed"] = speedup(seconds["train_gan, channels-last"],
                                                                      gan_seconds)
    section.notes.append("the loop's default is channels_last: false (the demo's train_gan sets it true); a ratio "
                         "above 1 says to turn it on for that stage")
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
