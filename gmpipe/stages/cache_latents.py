"""``cache_latents``: encode every prepared image once with the trained VAE; embed the captions; measure the
latent scale and shift. Writes ``data/latents/``."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from gmpipe.artifacts import atomic_dir, load_model_folder, write_json
from gmpipe.config.cache_latents import CacheLatentsConfig
from gmpipe.data.latents import STATS, LatentSplit, LatentStats, save_split, save_texts
from gmpipe.data.prepared import SPLITS, load_split
from gmpipe.device import resolve_device
from gmpipe.errors import GmpipeError
from gmpipe.paths import Paths

SECTIONS = ("cache_latents", "compute.device")


def load_vae(directory):
    from diffusers import AutoencoderKL

    load = lambda folder: AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()  # noqa: E731
    return load_model_folder(load, directory, "train_vae", "trained autoencoder",
                             ("config.json", "diffusion_pytorch_model.safetensors"))


@torch.no_grad()
def encode_to_latents(vae, images: np.ndarray, batch_size: int, desc: str,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) -> posterior mean and std, (N, c, h, w) float32 each on the CPU; the VAE runs
    on ``device`` (where it already is)."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).float().div(127.5).sub(1.0)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def run(config: CacheLatentsConfig, device: str, paths: Paths) -> dict:
    """``device`` is ``compute.device``: where the VAE and the text encoder run."""
    device = resolve_device(device)  # before any work: a device that is not there fails at once
    vae = load_vae(paths.vae).to(device)
    splits = {name: load_split(paths.prepared, name) for name in SPLITS}
    captions = sorted({str(c) for split in splits.values() for c in split.captions})
    caption_ids = {caption: i for i, caption in enumerate(captions)}
    counts = {}
    with atomic_dir(paths.latents) as out:
        for name, split in splits.items():
            mean, std = encode_to_latents(vae, split.images, config.batch_size, f"cache_latents: {name}", device)
            index = torch.tensor([caption_ids[str(c)] for c in split.captions], dtype=torch.int64)
            latent = LatentSplit(mean, std, torch.from_numpy(split.labels).long(), index)
            save_split(out, name, latent)
            counts[name] = len(latent)
            if name == "train":
                if len(latent) == 0:
                    raise GmpipeError(f"{paths.prepared}: the train split is empty")
                stats = LatentStats.measure(mean, std, torch.Generator().manual_seed(config.seed))
                stats.save(out / STATS, measured_on="train", n=len(latent), latent_shape=list(mean.shape[1:]),
                           raw_std=float((mean + std * torch.randn_like(std)).std()))
        if config.text_encoder:
            from gmpipe.nn.text_encoder import TextEncoder

            try:
                encoder = TextEncoder(config.text_encoder, max_length=config.max_length, device=device)
            except (FileNotFoundError, ValueError, OSError) as exc:
                raise GmpipeError(f"cache_latents.text_encoder: {exc}") from None
            states, mask = encoder.encode(captions, progress=True)
            save_texts(out, captions, states, mask)
            write_json(out / "text_encoder.json",
                       {"text_encoder": config.text_encoder, "max_length": config.max_length})
    return {
        "read": [str(paths.prepared), str(paths.vae)],
        "wrote": str(paths.latents),
        "counts": counts,
        "latent_shape": list(mean.shape[1:]),
        "captions": len(captions),
        "shift": [round(v, 4) for v in stats.shift],
        "scale": [round(v, 4) for v in stats.scale],
    }
