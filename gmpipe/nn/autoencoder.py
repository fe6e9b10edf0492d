"""The KL autoencoder: a diffusers ``AutoencoderKL`` built from a few sizes, and a preset registry.

The encoder maps images x of shape (B, C, H, W) to a diagonal Gaussian posterior q(z | x) over latents of
shape (B, latent_channels, H / f, W / f); the decoder maps latents back to (B, C, H, W). The downsampling
factor is f = 2 ** (len(block_out_channels) - 1): every encoder block but the last halves the resolution.

H and W must be divisible by f. Otherwise the encoder rounds odd sizes down (diffusers pads by one pixel
before each stride-2 conv) and the decoder's upsampling gives back a different size: 28x28 works for f = 2
and f = 4 (28 -> 14 -> 7), but not for f = 8 (7 -> 3, decoded to 24x24). `check_image_size` says so early.

The model is saved and loaded in the diffusers format (``save_pretrained`` / ``AutoencoderKL.from_pretrained``),
so a trained autoencoder is usable outside gmpipe. Its ``scaling_factor`` is set to 1.0 on purpose: the
latent scale and shift are measured on the data when latents are cached and stored next to them, and no
hard-coded constant (such as Stable Diffusion's 0.18215) should be applied on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from gmpipe.artifacts import load_model_folder
from gmpipe.errors import GmpipeError
from gmpipe.pixels import uint8_to_signed
from gmpipe.precision import bf16_autocast


def build_autoencoder(
    in_channels: int,
    block_out_channels: tuple[int, ...],
    latent_channels: int,
    layers_per_block: int,
    norm_num_groups: int,
    mid_block_attention: bool = True,
) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` with one Down/UpEncoderBlock2D per entry of ``block_out_channels``.

    Images (B, in_channels, H, W) -> latents (B, latent_channels, H / f, W / f), f = 2 ** (len(blocks) - 1);
    the decoder outputs as many channels as it reads. Every width must be divisible by ``norm_num_groups``.
    """
    if not block_out_channels:
        raise ValueError("block_out_channels must name at least one block width")
    bad_widths = [width for width in block_out_channels if width % norm_num_groups]
    if bad_widths:
        raise ValueError(
            f"block_out_channels {tuple(block_out_channels)}: widths {bad_widths} are not divisible "
            f"by norm_num_groups={norm_num_groups}"
        )
    n_blocks = len(block_out_channels)
    return attention_outputs_in_default_layout(AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_block_attention,
        scaling_factor=1.0,
    ))


def _default_layout(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The attention's output in its input's layout: NCHW, or channels-last when the model runs channels-last."""
    image = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None  # called by keyword: the default layout
    channels_last = image is not None and image.dim() == 4 and not image.is_contiguous() and \
        image.is_contiguous(memory_format=torch.channels_last)
    return output.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def attention_outputs_in_default_layout(vae: AutoencoderKL) -> AutoencoderKL:
    """``vae`` with each mid-block attention's output copied into the default (NCHW) layout, or channels-last in a
    model that runs channels-last (``channels_last: true``, for GPUs); returns ``vae``.

    diffusers' attention turns its (B, H*W, C) result back into an image by a transpose, which leaves it channels-last,
    and the residual additions pass that layout on to every later layer: the rest of the encoder and the whole decoder
    down to the first 1x1 shortcut. On a CPU, GroupNorm in channels-last is 2-3x slower than in NCHW in float32 and
    up to 10x slower in bf16, so one copy of a (B, C, h, w) tensor buys a 9-10% faster train_vae step (README,
    Performance). The hook is not part of the weights: every model gmpipe builds or loads gets it, once.
    """
    for half in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)):
        for attention in getattr(getattr(half, "mid_block", None), "attentions", None) or ():
            if attention is not None and _default_layout not in attention._forward_hooks.values():
                attention.register_forward_hook(_default_layout)
    return vae


@dataclass(frozen=True)
class AutoencoderPreset:
    """Architecture sizes of one autoencoder; the image channels come from the data."""

    block_out_channels: tuple[int, ...]
    latent_channels: int
    layers_per_block: int
    norm_num_groups: int

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def build(self, in_channels: int) -> AutoencoderKL:
        return build_autoencoder(
            in_channels,
            self.block_out_channels,
            self.latent_channels,
            self.layers_per_block,
            self.norm_num_groups,
        )


AUTOENCODER_PRESETS: dict[str, AutoencoderPreset] = {
    # Tests only: ~43k parameters with 1 channel, f = 2.
    "tiny": AutoencoderPreset((8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4),
    # Smoke runs and quick CPU demos: f = 4, e.g. 32x32 images -> 4x8x8 latents.
    "small": AutoencoderPreset((16, 32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=8),
    # The CPU demo on Fashion-MNIST: f = 4.
    "medium": AutoencoderPreset((32, 64, 64), latent_channels=4, layers_per_block=1, norm_num_groups=16),
    # GPU runs on larger images: f = 8, as in the Latent Diffusion f8 autoencoders.
    "large": AutoencoderPreset((64, 128, 256, 256), latent_channels=4, layers_per_block=2, norm_num_groups=32),
}


def build_autoencoder_preset(name: str, in_channels: int) -> AutoencoderKL:
    """The autoencoder of the preset ``name`` (a key of ``AUTOENCODER_PRESETS``) for ``in_channels``."""
    if name not in AUTOENCODER_PRESETS:
        raise KeyError(f"unknown autoencoder preset {name!r}; choose one of {sorted(AUTOENCODER_PRESETS)}")
    return AUTOENCODER_PRESETS[name].build(in_channels)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """f = 2 ** (number of blocks - 1): latents are (H / f, W / f)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_image_size(vae: AutoencoderKL, height: int, width: int) -> None:
    """Raise ValueError unless H and W are divisible by the downsampling factor (see the module docstring)."""
    factor = downsampling_factor(vae)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the autoencoder's downsampling factor {factor}; "
            f"resize or pad the images, or use fewer blocks"
        )


def decoder_last_layer(vae: AutoencoderKL) -> torch.nn.Parameter:
    """Weight of the decoder's final conv, (C, block_out_channels[0], 3, 3): where the adaptive GAN weight
    compares the gradients of the reconstruction and adversarial losses."""
    return vae.decoder.conv_out.weight


def load_autoencoder(directory: str | Path) -> AutoencoderKL:
    """The trained autoencoder in ``directory`` (``models/vae``, written by ``train_vae``), on the CPU in eval mode;
    a missing or damaged folder is one :class:`~gmpipe.artifacts.ArtifactError` naming it."""
    load = lambda folder: attention_outputs_in_default_layout(  # noqa: E731
        AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval())
    return load_model_folder(load, directory, "train_vae", "trained autoencoder",
                             ("config.json", "diffusion_pytorch_model.safetensors"))


@torch.no_grad()
def encode_to_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int, desc: str,
                      device: torch.device | str = "cpu", bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) -> posterior mean and std, (N, c, h, w) float32 each on the CPU; the autoencoder
    runs on ``device`` (where it already is), under bfloat16 autocast with ``bf16``."""
    means, stds = [], []
    autocast = bf16_autocast(device, bf16)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0):
        x = uint8_to_signed(torch.from_numpy(images[start : start + batch_size]).to(device))
        for part in autoencoder_passes(x, device):
            with autocast:
                posterior = vae.encode(part).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL | None, z: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Raw latents z (B, c, h, w) (as the encoder writes them, not normalized) -> images (B, C, H, W) in [-1, 1] on
    the CPU; the autoencoder runs on ``device`` (where it already is). Every family that generates latents decodes
    them here."""
    if vae is None:
        raise GmpipeError("no autoencoder loaded: load the model with autoencoder=<the models/vae folder>")
    return torch.cat([vae.decode(part).sample.float().clamp(-1, 1).cpu()
                      for part in autoencoder_passes(z.to(device), device)])


# On a CPU the autoencoder runs fastest on ~100 images a pass, whatever batch its caller works in: larger passes'
# activations outgrow the caches. On the 2-core Intel Xeon, decoding 1,200 latents of the demo's autoencoder ran at
# 1,600 images/s in passes of 100 against 1,360 in passes of 300 under bf16 autocast, and 890 against 450 in float32
# (encoding: 3,000 against 2,800 and 1,860 against 1,200; the small decoder 16,100 against 13,900 in bf16).
CPU_PASS_IMAGES = 100


def autoencoder_passes(batch: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """``batch`` (B, ...) as the passes an autoencoder (or small decoder) on ``device`` runs: views of at most
    ``CPU_PASS_IMAGES`` images on a CPU, the whole batch elsewhere (a GPU is fastest on the largest batch)."""
    if torch.device(device).type == "cpu":
        return batch.split(CPU_PASS_IMAGES)
    return (batch,)
