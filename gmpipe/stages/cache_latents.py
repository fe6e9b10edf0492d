"""``cache_latents``: encode every prepared image once with the trained VAE; embed the captions; measure the
latent scale and shift. Writes ``data/latents/``."""

from __future__ import annotations

import torch

from gmpipe.artifacts import atomic_dir
from gmpipe.config.cache_latents import CacheLatentsConfig
from gmpipe.data.latents import STATS, LatentSplit, LatentStats, save_split, save_texts
from gmpipe.data.prepared import SPLITS, load_split
from gmpipe.device import resolve_device
from gmpipe.errors import GmpipeError
from gmpipe.nn.autoencoder import encode_to_latents, load_autoencoder
from gmpipe.paths import Paths
from gmpipe.precision import resolve_precision

SECTIONS = ("cache_latents", "compute.device", "compute.threads")


def run(config: CacheLatentsConfig, device: str, threads: int | None, paths: Paths) -> dict:
    """``device`` is ``compute.device``: where the VAE and the text encoder run; ``threads`` is
    ``compute.threads``, torch's threads on a CPU (None: torch's default), as in the training stages."""
    device = resolve_device(device)  # before any work: a device that is not there fails at once
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    precision = resolve_precision(config.precision, device, "cache_latents.precision")
    vae = load_autoencoder(paths.vae).to(device)
    splits = {name: load_split(paths.prepared, name) for name in SPLITS}
    captions = sorted({str(c) for split in splits.values() for c in split.captions})
    caption_ids = {caption: i for i, caption in enumerate(captions)}
    counts = {}
    with atomic_dir(paths.latents) as out:
        for name, split in splits.items():
            mean, std = encode_to_latents(vae, split.images, config.batch_size, f"cache_latents: {name}", device,
                                           bf16=precision == "bf16")
            index = torch.tensor([caption_ids[str(c)] for c in split.captions], dtype=torch.int64)
            latent = LatentSplit(mean, std, torch.from_numpy(split.labels).long(), index)
            save_split(out, name, latent)
            counts[name] = len(latent)
            if name == "train":
                if len(latent) == 0:
                    raise GmpipeError(f"{paths.prepared}: the train split is empty")
                # Seeded, never the process's global RNG: what DVC hashes must not depend on what ran before.
                stats = LatentStats.measure(mean, std, torch.Generator().manual_seed(config.seed))
                eps = torch.randn(std.shape, generator=torch.Generator().manual_seed(config.seed))  # measure's draw
                stats.save(out / STATS, measured_on="train", n=len(latent), latent_shape=list(mean.shape[1:]),
                           raw_std=float((mean + std * eps).std()), encoder_precision=precision)
        if config.text_encoder:
            from gmpipe.nn.text_encoder import TextEncoder

            try:
                encoder = TextEncoder(config.text_encoder, max_length=config.max_length, device=device)
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise GmpipeError(f"cache_latents.text_encoder: {exc}") from None
            states, mask = encoder.encode(captions, progress=True)
            save_texts(out, captions, states, mask, config.text_encoder, config.max_length)
    return {
        "read": [str(paths.prepared), str(paths.vae)],
        "wrote": str(paths.latents),
        "counts": counts,
        "latent_shape": list(mean.shape[1:]),
        "captions": len(captions),
        "precision": precision,
        "shift": [round(v, 4) for v in stats.shift],
        "scale": [round(v, 4) for v in stats.scale],
    }
