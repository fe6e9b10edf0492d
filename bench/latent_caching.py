"""2. Latent caching: train_ldm steps/s from cached latents (in memory) vs encoding the images at every step.

Both cases run the shared loop on the same denoiser with train_ldm's loss. "cached" draws z from the stored
posterior (``make_batch_fn``, what train_ldm does); "encode every step" runs the demo autoencoder's encoder on
the uint8 images of the batch (``encode_to_latents``, what cache_latents does once) and then samples z.
"""

from __future__ import annotations

import torch

from bench.measure import interleave, median, quiet_stderr, speedup, spread
from bench.report import Section
from bench.workloads import (
    demo_autoencoder,
    ldm_batches,
    ldm_config,
    ldm_step,
    loop_seconds_per_step,
    synthetic_images,
    synthetic_latents,
)
from gmpipe.nn.autoencoder import encode_to_latents

SIZES = {
    "full": dict(preset="small", batch_size=256, items=4096, warmup=2, measured=6, rounds=4),
    "quick": dict(preset="tiny", batch_size=16, items=256, warmup=1, measured=2, rounds=2),
}


def encoding_batch_fn(vae, images: torch.Tensor, labels: torch.Tensor, stats):
    """index -> (normalized posterior sample, labels), encoding the batch's images with the autoencoder."""

    def make_batch(index, device):
        with quiet_stderr():
            mean, std = encode_to_latents(vae, images[index].numpy(), len(index), "encode")
        return stats.normalize(mean + std * torch.randn_like(std)).to(device), labels[index].to(device)

    return make_batch


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    config = ldm_config(s["preset"], s["batch_size"])
    split, stats = synthetic_latents(s["items"])
    images = synthetic_images(s["items"])
    cached = ldm_batches(split, stats)
    encoding = encoding_batch_fn(demo_autoencoder(), images, split.labels, stats)
    step = ldm_step(config)
    warmup, measured = s["warmup"], s["measured"]

    seconds = interleave({
        "cached latents": lambda: loop_seconds_per_step(config, step, len(split), cached, warmup, measured),
        "encode every step": lambda: loop_seconds_per_step(config, step, len(split), encoding, warmup, measured),
    }, s["rounds"])

    baseline = seconds["encode every step"]
    rows = [[name, 1 / median(t), median(t) * 1000, spread([1000 * v for v in t]), speedup(t, baseline)]
            for name, t in seconds.items()]
    section = Section(
        "latent_caching",
        f"Latent caching: train_ldm '{s['preset']}' DiT, batch {s['batch_size']}, demo autoencoder (32 px -> 4x8x8)",
        s["rounds"], ["case", "steps/s", "ms/step", "ms/step range", "speed vs encoding"], rows)
    section.ratios["cached / encode every step"] = speedup(seconds["cached latents"], baseline)
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
