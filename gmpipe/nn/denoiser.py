"""The latent denoiser: a diffusers transformer behind one interface, denoiser(x_t, t, cond) -> prediction.

x_t is a noisy latent (B, C, h, w), t the per-sample time (B,) in [0, 1] in gmpipe's convention (t = 0 data,
t = 1 noise, see ``gmpipe.diffusion``), and the prediction has the shape of x_t; what it predicts (velocity,
epsilon, ...) is the objective's business, not the network's.

One subclass per kind of condition the network reads (its ``mode``, written in ``denoiser.json``):
    LabelDenoiser          "class": ``DiTTransformer2DModel`` (Peebles & Xie 2023: adaLN-Zero blocks fed the sum
                           of a timestep and a class-label embedding). cond is a LongTensor (B,) of labels in
                           0..num_classes; the extra label ``null_label == num_classes`` is the learned "no class"
                           of classifier-free guidance.
    UnconditionalDenoiser  "none": the same DiT with a single class: the label is always 0 and cond is ignored. This
                           keeps one architecture (and one checkpoint format) for the conditional and
                           unconditional models.
    CaptionDenoiser        "text": ``PixArtTransformer2DModel`` (Chen et al. 2023: adaLN-single timestep modulation,
                           cross-attention on projected caption token states). cond is a tuple (states (B, L,
                           text_dim), mask (B, L)) with mask 1/True on real tokens. The unconditional caption is
                           one learned token, ``null_text_embedding`` (text_dim,), at position 0 with zero states
                           and mask 0 everywhere else.
Each knows its null condition and its condition dropout; which one a model uses is chosen by its conditioning
(``gmpipe.conditioning``), never by a string test.

Condition dropout (for classifier-free guidance) happens in the training step through ``drop_condition``,
never inside the network: diffusers' DiT label embedding would otherwise drop labels on its own in training
mode, independently in every block, so the constructor and ``from_pretrained`` switch that off.

The time is handed to diffusers as ``t * 1000``: its sinusoidal timestep embeddings are laid out for DDPM
step indices 0..999 (frequencies from 1 down to 10^-4 radians per step). With t in [0, 1] no channel's
phase would move by more than one radian over the whole trajectory, so the network would barely see the
time; scaled to [0, 1000] the embedding spreads over the range it was designed for. The direction already
agrees (a larger step index is noisier), and the time stays continuous (no rounding to integer steps).

Attention kernel: a forward pass with gradients on a CPU in bfloat16 or float16 (autocast or half weights) over at
most ``MATH_ATTENTION_TOKENS`` tokens runs under ``sdpa_kernel(SDPBackend.MATH)``. PyTorch's fused CPU attention is
slow in half precision on short sequences (bf16 forward + backward, 4 heads of 32, 16,384 tokens per case: 176 vs
26 ms for the math kernel at 16 tokens, 99 vs 46 at 64, 106 vs 95 at 128, but 78 vs 166 at 256; in float32 the
fused one wins at every length: ``python -m bench.cpu_kernels``), which made the demo's bf16 train_ldm step (8x8
latents in 2x2 patches: 16 tokens) slower than float32. Sampling (no gradients) keeps the fused kernel, faster there.

Activation: exact GELU in the feed-forward blocks (``ACTIVATION``), not DiT's and PixArt's tanh approximation
(diffusers' default "gelu-approximate", within 5e-4 of it): on a CPU the approximation costs 4x the exact kernel
(bf16, 8,000 x 512: 4.3 vs 1.0 ms forward, 13.3 vs 6.3 ms forward + backward), a quarter of the demo's bf16
sampling step. A saved model keeps the activation its ``config.json`` names.

Initialization is diffusers' (PyTorch defaults), not the DiT paper's zero-initialized modulation and output
layers: a fresh denoiser's output already depends on x_t, t and the condition.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmpipe.artifacts import ArtifactError, load_model_folder, read_json, read_safetensors
from gmpipe.diffusion.guidance import drop_conditions, drop_text_conditions
from gmpipe.diffusion.times import as_time
from gmpipe.nn.presets import DENOISER_PRESETS, DenoiserPreset, get_denoiser_preset
from gmpipe.precision import computes_in_half

MATH_ATTENTION_TOKENS = 128  # at most this many tokens: the math attention kernel (training, CPU, half precision)
ACTIVATION = "gelu"  # the feed-forward's of denoisers built now (diffusers' activation_fn; see the module docstring)

__all__ = ["DENOISER_PRESETS", "CaptionDenoiser", "Denoiser", "DenoiserPreset", "LabelDenoiser",
           "UnconditionalDenoiser", "get_denoiser_preset"]

DIFFUSERS_TIMESTEPS = 1000  # t in [0, 1] -> diffusers timestep t * 1000 (see the module docstring)

# The diffusers model's files sit in the denoiser folder itself; folders written before kept them in model/.
TRANSFORMER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
LEGACY_MODEL_FOLDER = "model"
CONFIG_FILE = "denoiser.json"
NULL_TEXT_FILE = "null_text.safetensors"
NULL_TEXT_KEY = "null_text_embedding"


def _weights_folder(directory: Path) -> Path:
    """Where the diffusers model of a denoiser folder is: the folder itself, or ``model/`` in older folders."""
    legacy = directory / LEGACY_MODEL_FOLDER
    if not (directory / TRANSFORMER_FILES[0]).is_file() and (legacy / TRANSFORMER_FILES[0]).is_file():
        return legacy
    return directory


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
        activation_fn=ACTIVATION,
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
        activation_fn=ACTIVATION,
    )


def disable_label_dropout(model: nn.Module) -> None:
    """Set every diffusers ``LabelEmbedding``'s own dropout to 0, keeping its null row (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            if module.embedding_table.num_embeddings != module.num_classes + 1:
                raise ValueError("the DiT label embedding has no null-label row")
            module.dropout_prob = 0.0


def attention_kernel(x: Tensor, tokens: int) -> contextlib.AbstractContextManager:
    """The attention kernel for a forward pass on ``x`` over ``tokens`` tokens: the math one while training in half
    precision on a CPU with at most ``MATH_ATTENTION_TOKENS`` tokens (see the module docstring), else PyTorch's."""
    if x.device.type == "cpu" and computes_in_half(x) and torch.is_grad_enabled() and tokens <= MATH_ATTENTION_TOKENS:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class Denoiser(nn.Module):
    """denoiser(x_t (B, C, h, w), t (B,) in [0, 1], cond) -> prediction (B, C, h, w); see the module docstring.

    Attributes: mode (the kind of condition, class attribute), preset, in_channels, sample_size (h = w),
    transformer (the diffusers model), num_classes (the class count of a LabelDenoiser, 0 otherwise), null_label
    (== num_classes for a LabelDenoiser, None otherwise) and text_dim (a CaptionDenoiser's, else None).
    """

    mode: ClassVar[str]
    num_classes: int = 0
    null_label: int | None = None
    text_dim: int | None = None

    def __init__(self, in_channels: int, sample_size: int, preset: str | DenoiserPreset = "small") -> None:
        super().__init__()
        self.preset = get_denoiser_preset(preset)
        self.in_channels = in_channels
        self.sample_size = sample_size
        if sample_size % self.preset.patch_size:
            raise ValueError(f"latent size {sample_size} is not divisible by patch size {self.preset.patch_size}")

    @property
    def tokens(self) -> int:
        """The transformer's sequence length: latent patches."""
        return (self.sample_size // self.preset.patch_size) ** 2

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """The prediction (B, C, h, w) for x_t (B, C, h, w) at times t ((B,) or a float) under cond."""
        with attention_kernel(x_t, self.tokens):
            return self.predict(x_t, as_time(t, x_t) * DIFFUSERS_TIMESTEPS, cond)

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        """The transformer's prediction at diffusers timesteps (B,) = t * 1000."""
        raise NotImplementedError

    def null_condition(self, batch_size: int, like: Any = None, device: torch.device | str | None = None) -> Any:
        """The unconditional cond for a batch of ``batch_size`` (shaped like ``like`` where that matters)."""
        raise NotImplementedError

    def drop_condition(self, cond: Any, p_uncond: float, generator: torch.Generator | None = None) -> Any:
        """cond with each sample's condition replaced by the null one with probability p_uncond (the
        classifier-free guidance training dropout)."""
        raise NotImplementedError

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
        """Write the diffusers model into ``directory`` (``config.json``, ``diffusion_pytorch_model.safetensors``:
        a diffusers model folder that ``DiTTransformer2DModel.from_pretrained`` or a pipeline loads as it is), and
        beside it ``denoiser.json`` and what the subclass keeps (a CaptionDenoiser's ``null_text.safetensors``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(directory, safe_serialization=True)
        self._save_extra(directory)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_config(), indent=2) + "\n")

    def _save_extra(self, directory: Path) -> None:
        pass

    def _load_extra(self, directory: Path, stage: str) -> None:
        pass

    @classmethod
    def from_pretrained(cls, directory: str | Path, stage: str = "train_ldm") -> Denoiser:
        """Load what ``save_pretrained`` wrote (safetensors only), on the CPU and in eval mode (as diffusers'
        ``from_pretrained`` does); call ``.train()`` to train it further. A missing or damaged file is one
        :class:`~gmpipe.artifacts.ArtifactError` naming it and ``stage``, the stage that writes the folder."""
        directory = Path(directory)
        weights = _weights_folder(directory)
        required = (CONFIG_FILE, *(str((weights / name).relative_to(directory)) for name in TRANSFORMER_FILES))
        return load_model_folder(lambda folder: cls._load(folder, stage), directory, stage, "denoiser", required)

    @classmethod
    def _load(cls, directory: Path, stage: str) -> Denoiser:
        shell = cls._shell(directory, stage)
        transformer = type(shell.transformer).from_pretrained(_weights_folder(directory), use_safetensors=True)
        return cls._completed(shell, transformer, directory, stage)

    @classmethod
    def around(cls, transformer: nn.Module, directory: str | Path, stage: str = "train_ldm") -> Denoiser:
        """The denoiser of the model folder ``directory`` (``denoiser.json`` and the extras beside it) around a
        ``transformer`` already loaded from it (as a diffusers pipeline loads its ``denoiser`` component), so the
        weights are read once."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ArtifactError(directory / CONFIG_FILE, "missing from the denoiser folder", stage)
        shell = cls._shell(directory, stage)
        if type(transformer) is not type(shell.transformer):
            raise ArtifactError(directory / CONFIG_FILE, f"describes a {type(shell.transformer).__name__}, not the "
                                                         f"{type(transformer).__name__} given", stage)
        return cls._completed(shell, transformer, directory, stage)

    @classmethod
    def _shell(cls, directory: Path, stage: str) -> Denoiser:
        """The denoiser ``denoiser.json`` describes, built on the meta device (no memory, no random init): every
        weight is replaced by ``_completed``."""
        config = read_json(directory / CONFIG_FILE, stage)
        kinds = {subclass.mode: subclass for subclass in Denoiser.__subclasses__()}
        if config.get("mode") not in kinds:
            raise ArtifactError(directory / CONFIG_FILE, f"mode must be one of {sorted(kinds)}", stage)
        with torch.device("meta"):
            return kinds[config["mode"]]._from_config(config)

    @staticmethod
    def _completed(shell: Denoiser, transformer: nn.Module, directory: Path, stage: str) -> Denoiser:
        disable_label_dropout(transformer)
        shell.transformer = transformer
        shell._load_extra(directory, stage)
        return shell.eval()

    @classmethod
    def _from_config(cls, config: dict) -> Denoiser:
        return cls(config["in_channels"], config["sample_size"], DenoiserPreset(**config["preset"]))


class LabelDenoiser(Denoiser):
    """A class-conditional DiT: cond is labels (B,) in 0..num_classes, ``null_label == num_classes``."""

    mode = "class"

    def __init__(self, in_channels: int, sample_size: int, preset: str | DenoiserPreset = "small",
                 num_classes: int = 1) -> None:
        super().__init__(in_channels, sample_size, preset)
        if num_classes < 1:
            raise ValueError(f"a class-conditional denoiser needs num_classes >= 1, got {num_classes}")
        self.num_classes = self.null_label = num_classes
        self.transformer = build_dit(self.preset, in_channels, sample_size, num_classes)

    @classmethod
    def _from_config(cls, config: dict) -> Denoiser:
        return cls(config["in_channels"], config["sample_size"], DenoiserPreset(**config["preset"]),
                   num_classes=config["num_classes"])

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        if cond is None:
            raise ValueError("a class-conditional denoiser needs labels; use null_condition() for none")
        labels = cond.to(device=x_t.device, dtype=torch.long)
        return self.transformer(x_t, timestep=timestep, class_labels=labels, return_dict=False)[0]

    def null_condition(self, batch_size: int, like: Any = None, device: torch.device | str | None = None) -> Tensor:
        """Null labels (B,) on ``device`` (default: ``like``'s)."""
        if device is None and isinstance(like, Tensor):
            device = like.device
        return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)

    def drop_condition(self, cond: Tensor, p_uncond: float, generator: torch.Generator | None = None) -> Tensor:
        return drop_conditions(cond, p_uncond, self.null_label, generator=generator)


class UnconditionalDenoiser(Denoiser):
    """The DiT with a single class: the label is always 0 and cond is ignored (its null condition is None)."""

    mode = "none"

    def __init__(self, in_channels: int, sample_size: int, preset: str | DenoiserPreset = "small") -> None:
        super().__init__(in_channels, sample_size, preset)
        self.transformer = build_dit(self.preset, in_channels, sample_size, 1)

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        labels = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
        return self.transformer(x_t, timestep=timestep, class_labels=labels, return_dict=False)[0]

    def null_condition(self, batch_size: int, like: Any = None, device: torch.device | str | None = None) -> None:
        return None

    def drop_condition(self, cond: Any, p_uncond: float, generator: torch.Generator | None = None) -> Any:
        return cond


class CaptionDenoiser(Denoiser):
    """PixArt on caption token states: cond is (states (B, L, text_dim), mask (B, L)); the null caption is the
    learned token ``null_text_embedding`` (text_dim,)."""

    mode = "text"

    def __init__(self, in_channels: int, sample_size: int, preset: str | DenoiserPreset = "small",
                 text_dim: int | None = None) -> None:
        super().__init__(in_channels, sample_size, preset)
        if text_dim is None or text_dim < 1:
            raise ValueError(f"a text-conditional denoiser needs text_dim >= 1, got {text_dim}")
        self.text_dim = text_dim
        self.transformer = build_pixart(self.preset, in_channels, sample_size, text_dim)
        self.null_text_embedding = nn.Parameter(torch.randn(text_dim) * 0.02)

    @classmethod
    def _from_config(cls, config: dict) -> Denoiser:
        return cls(config["in_channels"], config["sample_size"], DenoiserPreset(**config["preset"]),
                   text_dim=config["text_dim"])

    def predict(self, x_t: Tensor, timestep: Tensor, cond: Any) -> Tensor:
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

    def null_condition(self, batch_size: int, like: Any = None,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(states (B, L, D), mask (B, L)) with L, the mask dtype and the device taken from ``like`` (a text cond),
        or L = 1."""
        length, mask_dtype = 1, torch.bool
        if like is not None:
            like_states, like_mask = like
            length, mask_dtype = like_states.shape[1], like_mask.dtype
            device = like_states.device if device is None else device
        states, mask = self._null_caption(length, device=device, mask_dtype=mask_dtype)
        return states.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    def drop_condition(self, cond: tuple[Tensor, Tensor], p_uncond: float,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
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

    def _save_extra(self, directory: Path) -> None:
        save_file({NULL_TEXT_KEY: self.null_text_embedding.detach().cpu().contiguous()}, directory / NULL_TEXT_FILE)

    def _load_extra(self, directory: Path, stage: str) -> None:
        null_text = read_safetensors(directory / NULL_TEXT_FILE, stage, (NULL_TEXT_KEY,))[NULL_TEXT_KEY]
        self.null_text_embedding = nn.Parameter(null_text)
