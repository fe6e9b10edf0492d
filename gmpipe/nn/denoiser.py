"""The latent denoiser: a diffusers transformer behind one interface, denoiser(x_t, t, cond) -> prediction.

x_t is a noisy latent (B, C, h, w), t the per-sample time (B,) in [0, 1] in gmpipe's convention (t = 0 data,
t = 1 noise, see ``gmpipe.diffusion``), and the prediction has the shape of x_t; what it predicts (velocity,
epsilon, ...) is the objective's business, not the network's.

Conditioning ``mode``:
    "class"  ``DiTTransformer2DModel`` (Peebles & Xie 2023: adaLN-Zero blocks fed the sum of a timestep and a
             class-label embedding). cond is a LongTensor (B,) of labels in 0..num_classes; the extra label
             ``null_label == num_classes`` is the learned "no class" of classifier-free guidance.
    "none"   the same DiT with a single class: the label is always 0 and cond is ignored. This keeps one
             architecture (and one checkpoint format) for the conditional and unconditional models.
    "text"   ``PixArtTransformer2DModel`` (Chen et al. 2023: adaLN-single timestep modulation, cross-attention
             on projected caption token states). cond is a tuple (states (B, L, text_dim), mask (B, L)) with
             mask 1/True on real tokens. The unconditional caption is one learned token, ``null_text_embedding``
             (text_dim,), at position 0 with zero states and mask 0 everywhere else.

Condition dropout (for classifier-free guidance) happens in the training step through ``drop_condition``,
never inside the network: diffusers' DiT label embedding would otherwise drop labels on its own in training
mode, independently in every block, so the constructor and ``from_pretrained`` switch that off.

The time is handed to diffusers as ``t * 1000``: its sinusoidal timestep embeddings are laid out for DDPM
step indices 0..999 (frequencies from 1 down to 10^-4 radians per step). With t in [0, 1] no channel's
phase would move by more than one radian over the whole trajectory, so the network would barely see the
time; scaled to [0, 1000] the embedding spreads over the range it was designed for. The direction already
agrees (a larger step index is noisier), and the time stays continuous (no rounding to integer steps).

Initialization is diffusers' (PyTorch defaults), not the DiT paper's zero-initialized modulation and output
layers: a fresh denoiser's output already depends on x_t, t and the condition.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import save_file
from torch import Tensor, nn

from gmpipe.artifacts import load_model_folder, read_json, read_safetensors
from gmpipe.diffusion.guidance import drop_conditions, drop_text_conditions
from gmpipe.diffusion.times import as_time

MODES = ("none", "class", "text")
DIFFUSERS_TIMESTEPS = 1000  # t in [0, 1] -> diffusers timestep t * 1000 (see the module docstring)

MODEL_FOLDER = "model"
CONFIG_FILE = "denoiser.json"
NULL_TEXT_FILE = "null_text.safetensors"
NULL_TEXT_KEY = "null_text_embedding"


@dataclass(frozen=True)
class DenoiserPreset:
    """Transformer sizes: token width, number of blocks, attention heads (width = heads * head_dim) and the
    patch size in latent pixels (a h x w latent becomes (h / patch_size) * (w / patch_size) tokens)."""

    width: int
    depth: int
    heads: int
    patch_size: int

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.heads, self.patch_size) < 1:
            raise ValueError(f"denoiser sizes must be positive, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads} (width = heads * head_dim)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


DENOISER_PRESETS: dict[str, DenoiserPreset] = {
    # Tests only: a few tens of thousands of parameters.
    "tiny": DenoiserPreset(width=32, depth=2, heads=2, patch_size=2),
    # CPU demos and smoke runs: about 1.4M parameters as a class-conditional DiT on 4x8x8 latents.
    "small": DenoiserPreset(width=128, depth=4, heads=4, patch_size=2),
    # GPU runs: DiT-S width and depth (about 35M parameters with class labels).
    "base": DenoiserPreset(width=384, depth=12, heads=6, patch_size=2),
}


def get_denoiser_preset(preset: str | DenoiserPreset) -> DenoiserPreset:
    """A preset object, or the one registered under that name in ``DENOISER_PRESETS``."""
    if isinstance(preset, DenoiserPreset):
        return preset
    if preset not in DENOISER_PRESETS:
        raise KeyError(f"unknown denoiser preset {preset!r}; choose one of {sorted(DENOISER_PRESETS)}")
    return DENOISER_PRESETS[preset]


def build_dit(preset: DenoiserPreset, in_channels: int, sample_size: int, num_classes: int) -> DiTTransformer2DModel:
    """A class-conditional DiT whose label tables have num_classes + 1 rows (the last is the null label) and
    whose built-in label dropout is off."""
    model = DiTTransformer2DModel(
        num_attention_heads=preset.heads,
        attention_head_dim=preset.head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=preset.depth,
        sample_size=sample_size,
        patch_size=preset.patch_size,
        # DiT's "number of AdaLayerNorm embeddings" is its number of classes; diffusers always builds the label
        # table with dropout 0.1, which is what gives it the extra null row
        num_embeds_ada_norm=num_classes,
    )
    disable_label_dropout(model)
    return model


def build_pixart(preset: DenoiserPreset, in_channels: int, sample_size: int, text_dim: int) -> PixArtTransformer2DModel:
    """A PixArt transformer that cross-attends to caption token states of width text_dim."""
    return PixArtTransformer2DModel(
        num_attention_heads=preset.heads,
        attention_head_dim=preset.head_dim,
        in_channels=in_channels,
        out_channels=in_channels,  # PixArt's default 2 * in_channels also predicts a variance; we do not
        num_layers=preset.depth,
        cross_attention_dim=preset.width,  # the caption projection maps text_dim -> width
        sample_size=sample_size,
        patch_size=preset.patch_size,
        interpolation_scale=1,
        use_additional_conditions=False,  # no resolution / aspect-ratio embeddings (PixArt enables them at 128)
        caption_channels=text_dim,
    )


def disable_label_dropout(model: nn.Module) -> None:
    """Set every diffusers ``LabelEmbedding``'s own dropout to 0, keeping its null row (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            if module.embedding_table.num_embeddings != module.num_classes + 1:
                raise ValueError("the DiT label embedding has no null-label row")
            module.dropout_prob = 0.0


class Denoiser(nn.Module):
    """denoiser(x_t (B, C, h, w), t (B,) in [0, 1], cond) -> prediction (B, C, h, w); see the module docstring.

    Attributes: mode, preset, in_channels, sample_size (h = w), text_dim (text mode, else None), transformer
    (the diffusers model), num_classes (the class count for mode "class", 0 otherwise) and null_label
    (== num_classes for mode "class", None otherwise). In text mode ``null_text_embedding`` is the learned
    unconditional caption token (text_dim,).
    """

    def __init__(
        self,
        mode: str,
        in_channels: int,
        sample_size: int,
        preset: str | DenoiserPreset = "small",
        num_classes: int = 1,
        text_dim: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown conditioning mode {mode!r}; choose one of {list(MODES)}")
        self.mode = mode
        self.preset = get_denoiser_preset(preset)
        self.in_channels = in_channels
        self.sample_size = sample_size
        if sample_size % self.preset.patch_size:
            raise ValueError(f"latent size {sample_size} is not divisible by patch size {self.preset.patch_size}")
        self.num_classes = num_classes if mode == "class" else 0
        self.null_label = num_classes if mode == "class" else None
        self.text_dim = text_dim if mode == "text" else None
        if mode == "class" and num_classes < 1:
            raise ValueError(f"a class-conditional denoiser needs num_classes >= 1, got {num_classes}")
        if mode == "text":
            if text_dim is None or text_dim < 1:
                raise ValueError(f"a text-conditional denoiser needs text_dim >= 1, got {text_dim}")
            self.transformer = build_pixart(self.preset, in_channels, sample_size, text_dim)
            self.null_text_embedding = nn.Parameter(torch.randn(text_dim) * 0.02)
        else:
            self.transformer = build_dit(self.preset, in_channels, sample_size, max(self.num_classes, 1))

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """The prediction (B, C, h, w) for x_t (B, C, h, w) at times t ((B,) or a float) under cond."""
        timestep = as_time(t, x_t) * DIFFUSERS_TIMESTEPS
        if self.mode == "text":
            if cond is None:
                raise ValueError("a text-conditional denoiser needs cond = (states, mask); use null_condition()")
            states, mask = cond
            return self.transformer(
                x_t,
                encoder_hidden_states=states.to(x_t.dtype),
                timestep=timestep,
                encoder_attention_mask=mask.to(x_t.dtype),  # (B, L) 1 keep / 0 ignore; PixArt makes it a bias
                return_dict=False,
            )[0]
        if self.mode == "class":
            if cond is None:
                raise ValueError("a class-conditional denoiser needs labels; use null_condition() for none")
            labels = cond.to(device=x_t.device, dtype=torch.long)
        else:
            labels = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
        return self.transformer(x_t, timestep=timestep, class_labels=labels, return_dict=False)[0]

    def null_condition(self, batch_size: int, like: Any = None, device: torch.device | str | None = None) -> Any:
        """The unconditional cond for a batch: null labels (B,) in class mode; in text mode (states (B, L, D),
        mask (B, L)) with L, the mask dtype and the device taken from ``like`` (a text cond) or L = 1; None in
        mode "none"."""
        if self.mode == "none":
            return None
        if self.mode == "class":
            if device is None and isinstance(like, Tensor):
                device = like.device
            return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)
        length, mask_dtype = 1, torch.bool
        if like is not None:
            like_states, like_mask = like
            length, mask_dtype = like_states.shape[1], like_mask.dtype
            device = like_states.device if device is None else device
        states, mask = self._null_caption(length, device=device, mask_dtype=mask_dtype)
        return states.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    def drop_condition(self, cond: Any, p_uncond: float, generator: torch.Generator | None = None) -> Any:
        """cond with each sample's condition replaced by the null one with probability p_uncond (the
        classifier-free guidance training dropout). Mode "none" returns cond unchanged."""
        if self.mode == "none":
            return cond
        if self.mode == "class":
            return drop_conditions(cond, p_uncond, self.null_label, generator=generator)
        states, mask = cond
        null_states, null_mask = self._null_caption(states.shape[1], device=states.device, mask_dtype=mask.dtype)
        return drop_text_conditions(states, mask, p_uncond, null_states, null_mask, generator=generator)

    def _null_caption(
        self, length: int, device: torch.device | str | None, mask_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """The null caption as (states (L, D), mask (L,)): the learned token first, zeros after it, masked out.
        Built from the parameter so that it receives gradients where it replaces a caption."""
        token = self.null_text_embedding.to(device)
        states = torch.cat([token[None], token.new_zeros(length - 1, token.shape[0])])
        mask = torch.zeros(length, dtype=mask_dtype, device=token.device)
        mask[0] = 1
        return states, mask

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of storing its activations."""
        self.transformer.enable_gradient_checkpointing()

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def to_config(self) -> dict:
        """What ``denoiser.json`` stores: enough to rebuild the architecture."""
        return {
            "mode": self.mode,
            "preset": asdict(self.preset),
            "num_classes": self.num_classes,
            "text_dim": self.text_dim,
            "in_channels": self.in_channels,
            "sample_size": self.sample_size,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/model`` (the diffusers model, safetensors), ``directory/denoiser.json`` and, in text
        mode, ``directory/null_text.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(directory / MODEL_FOLDER, safe_serialization=True)
        if self.mode == "text":
            save_file({NULL_TEXT_KEY: self.null_text_embedding.detach().cpu().contiguous()}, directory / NULL_TEXT_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, stage: str = "train_ldm") -> Denoiser:
        """Load what ``save_pretrained`` wrote (safetensors only), on the CPU and in eval mode (as diffusers'
        ``from_pretrained`` does); call ``.train()`` to train it further. A missing or damaged file is one
        :class:`~gmpipe.artifacts.ArtifactError` naming it and ``stage``, the stage that writes the folder."""
        directory = Path(directory)
        required = (CONFIG_FILE, f"{MODEL_FOLDER}/config.json", f"{MODEL_FOLDER}/diffusion_pytorch_model.safetensors")
        return load_model_folder(lambda folder: cls._load(folder, stage), directory, stage, "denoiser", required)

    @classmethod
    def _load(cls, directory: Path, stage: str) -> Denoiser:
        config = read_json(directory / CONFIG_FILE, stage)
        # the shell is built on the meta device (no memory, no random init): its weights are all replaced below
        with torch.device("meta"):
            denoiser = cls(
                config["mode"],
                in_channels=config["in_channels"],
                sample_size=config["sample_size"],
                preset=DenoiserPreset(**config["preset"]),
                num_classes=config["num_classes"],
                text_dim=config["text_dim"],
            )
        model_class = PixArtTransformer2DModel if denoiser.mode == "text" else DiTTransformer2DModel
        transformer = model_class.from_pretrained(directory / MODEL_FOLDER, use_safetensors=True)
        disable_label_dropout(transformer)
        denoiser.transformer = transformer
        if denoiser.mode == "text":
            null_text = read_safetensors(directory / NULL_TEXT_FILE, stage, (NULL_TEXT_KEY,))[NULL_TEXT_KEY]
            denoiser.null_text_embedding = nn.Parameter(null_text)
        return denoiser.eval()
