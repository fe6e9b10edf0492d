"""What a model is conditioned on, as small objects: class labels, text captions, or nothing.

A conditioning knows, for its kind, everything the rest of gmpipe would otherwise ask "which kind?" for:

- its config, ``conditioning.json`` in every model folder (``save`` / ``load``; the kind is the ``mode`` key);
- the condition batch for what a caller asks (:meth:`Conditioning.encode`): per sample a class label (an int), a
  prompt (a str) or nothing (None). Class labels given to a text model become their class captions ("a photo of a
  <class name>"), so every conditional model can be evaluated per class;
- the conditions of the training items (:meth:`Conditioning.training_conditions`, from the cached latents) and the
  rows of a sample grid (:meth:`Conditioning.grid_rows`, :meth:`Conditioning.rows`);
- the denoiser network that reads its conditions (:meth:`Conditioning.make_denoiser`), which makes the null
  condition and drops conditions with probability p (``gmpipe.nn.denoiser``: the null caption is learned there).

A condition batch is a tensor (labels (B,)), a tuple (caption states (B, L, D), mask (B, L)) or None; taking rows,
joining and moving batches is the same for every kind (``gmpipe.batching``). The kinds are registered by name in
``gmpipe.registry.CONDITIONINGS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from gmpipe.artifacts import read_json
from gmpipe.data.captions import caption_for_class
from gmpipe.data.latents import LatentSplit, load_text_encoder_info, load_texts
from gmpipe.errors import GmpipeError
from gmpipe.registry import CONDITIONINGS

CONDITIONING_FILE = "conditioning.json"

# A caller's request for one sample: a class label, a prompt, or nothing.
Request = int | str | None
# index (B,) of training items -> their condition batch (on the CPU)
ConditionsOf = Callable[[Tensor], Any]


class ConditioningFile(BaseModel):
    """``conditioning.json``: the kind (``mode``), the class names, and what the kind itself stores."""

    model_config = ConfigDict(extra="allow", strict=True)
    mode: str
    class_names: list[str]


class Conditioning:
    """What a model is conditioned on; one subclass per kind (see the module docstring).

    ``class_names`` are the dataset's classes (every kind keeps them: evaluation asks for samples per class).
    ``conditional`` says whether samples depend on a condition (and so whether guidance and per-class metrics mean
    anything).
    """

    conditional: ClassVar[bool] = True

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)

    @property
    def kind(self) -> str:
        """The registered name (``conditioning.json``'s ``mode``)."""
        return CONDITIONINGS.name_of(self)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()

    def to_config(self) -> dict:
        return {"mode": self.kind, "class_names": list(self.class_names)}

    @classmethod
    def from_config(cls, config: dict) -> Conditioning:
        """The conditioning a ``conditioning.json`` describes (ValueError naming what is wrong)."""
        checked = ConditioningFile.model_validate(config)
        if checked.mode not in CONDITIONINGS:
            raise ValueError(f"mode: must be one of {', '.join(CONDITIONINGS.names)} (got {checked.mode[:40]!r})")
        return CONDITIONINGS[checked.mode]._from_config(checked.model_dump())

    @classmethod
    def _from_config(cls, config: dict) -> Conditioning:
        return cls(config["class_names"])

    def save(self, folder: Path) -> None:
        (Path(folder) / CONDITIONING_FILE).write_text(json.dumps(self.to_config(), indent=2))

    @staticmethod
    def load(folder: Path, stage: str) -> Conditioning:
        """``folder/conditioning.json``; a damaged file is one ArtifactError naming it and ``stage``."""
        return read_json(Path(folder) / CONDITIONING_FILE, stage, Conditioning.from_config)

    @staticmethod
    def for_training(kind: str, class_names: Sequence[str], latents: Path) -> Conditioning:
        """The conditioning ``kind`` of a model trained on the cached latents in ``latents``."""
        return CONDITIONINGS.lookup(kind)._for_training(class_names, Path(latents))

    @classmethod
    def _for_training(cls, class_names: Sequence[str], latents: Path) -> Conditioning:
        return cls(class_names)

    def encode(self, requests: Sequence[Request], device: torch.device | str = "cpu") -> Any:
        """The condition batch for one request per sample (a class label, a prompt or None), on ``device``."""
        raise NotImplementedError

    def training_conditions(self, split: LatentSplit, latents: Path | None = None) -> ConditionsOf:
        """index (B,) of items of ``split`` -> their condition batch (CPU); ``latents`` is the cached latents folder
        the split comes from (text captions are read from it)."""
        raise NotImplementedError

    def rows(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> list[Request]:
        """One request per row of a sample grid from what a user asked for (``gmpipe sample``)."""
        raise NotImplementedError

    def grid_rows(self, latents: Path) -> list[Request]:
        """The rows of a training sample grid (``train_ldm``'s ``samples.png``)."""
        raise NotImplementedError

    def make_denoiser(self, latent_shape: Sequence[int], preset: str) -> torch.nn.Module:
        """A fresh denoiser for latents (c, h, w) that reads this kind of condition."""
        raise NotImplementedError

    def _check_labels(self, labels: Sequence[int]) -> None:
        bad = [label for label in labels if not 0 <= label < len(self.class_names)]
        if bad:
            raise GmpipeError(f"class labels {bad[:5]} out of range 0..{len(self.class_names) - 1}")


def _is_label(request: Request) -> bool:
    return isinstance(request, Integral) and not isinstance(request, bool)


def _square(latent_shape: Sequence[int]) -> tuple[int, int]:
    channels, height, width = latent_shape
    if height != width:
        raise GmpipeError(f"latents are {height}x{width}; the denoiser needs square latents")
    return channels, height


class ClassLabels(Conditioning):
    """Class-conditional: a condition is a label in 0..len(class_names) - 1 (LongTensor (B,))."""

    def encode(self, requests: Sequence[Request], device: torch.device | str = "cpu") -> Tensor:
        if not all(_is_label(r) for r in requests):
            raise GmpipeError("this model is class-conditional: give class labels")
        self._check_labels(requests)
        return torch.tensor([int(r) for r in requests], dtype=torch.long, device=device)

    def training_conditions(self, split: LatentSplit, latents: Path | None = None) -> ConditionsOf:
        return lambda index: split.labels[index]

    def rows(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> list[Request]:
        if prompts:
            raise GmpipeError("--prompts: this model is class-conditional: give --classes instead")
        chosen = list(classes) if classes else list(range(len(self.class_names)))
        bad = [c for c in chosen if c >= len(self.class_names)]
        if bad:
            raise GmpipeError(f"--classes {bad[0]}: this model has classes 0..{len(self.class_names) - 1}")
        return chosen

    def grid_rows(self, latents: Path) -> list[Request]:
        return list(range(len(self.class_names)))

    def make_denoiser(self, latent_shape: Sequence[int], preset: str) -> torch.nn.Module:
        from gmpipe.nn.denoiser import LabelDenoiser

        channels, size = _square(latent_shape)
        return LabelDenoiser(channels, size, preset, num_classes=len(self.class_names))


class TextCaptions(Conditioning):
    """Text-conditional: a condition is a caption's token states and mask from the frozen ``text_encoder``
    (``(states (B, L, D), mask (B, L))``, L = ``max_length``). Class labels become their class captions."""

    def __init__(self, class_names: Sequence[str], text_encoder: str, max_length: int,
                 text_dim: int | None = None) -> None:
        super().__init__(class_names)
        self.text_encoder, self.max_length, self.text_dim = text_encoder, max_length, text_dim
        self._encoders: dict[str, Any] = {}

    def to_config(self) -> dict:
        config = {**super().to_config(), "text_encoder": self.text_encoder, "max_length": self.max_length}
        return config if self.text_dim is None else {**config, "text_dim": self.text_dim}

    @classmethod
    def _from_config(cls, config: dict) -> Conditioning:
        encoder, length, dim = config.get("text_encoder"), config.get("max_length"), config.get("text_dim")
        if not isinstance(encoder, str) or not isinstance(length, int) or length < 1:
            raise ValueError("a text-conditional model needs text_encoder (a string) and max_length (>= 1)")
        return cls(config["class_names"], encoder, length, dim if isinstance(dim, int) else None)

    @classmethod
    def _for_training(cls, class_names: Sequence[str], latents: Path) -> Conditioning:
        info = load_text_encoder_info(latents)
        _, states, _ = load_texts(latents)
        return cls(class_names, info["text_encoder"], info["max_length"], text_dim=states.shape[-1])

    def encode(self, requests: Sequence[Request], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        if not all(_is_label(r) or isinstance(r, str) for r in requests):
            raise GmpipeError("this model is text-conditional: give prompts")
        self._check_labels([r for r in requests if _is_label(r)])
        captions = [caption_for_class(self.class_names[r]) if _is_label(r) else r for r in requests]
        states, mask = self._encoder(device).encode(captions)
        return states.to(device), mask.to(device)

    def _encoder(self, device: torch.device | str):
        """The frozen text encoder on ``device``, loaded once."""
        key = str(torch.device(device))
        if key not in self._encoders:
            from gmpipe.nn.text_encoder import TextEncoder

            self._encoders[key] = TextEncoder(self.text_encoder, max_length=self.max_length, device=device)
        return self._encoders[key]

    def training_conditions(self, split: LatentSplit, latents: Path | None = None) -> ConditionsOf:
        _, states, mask = load_texts(latents)
        return lambda index: (states[split.caption_index[index]], mask[split.caption_index[index]])

    def rows(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> list[Request]:
        if not prompts:
            raise GmpipeError("--prompts: this model is text-conditional: give prompts")
        return list(prompts)

    def grid_rows(self, latents: Path) -> list[Request]:
        return list(load_texts(latents)[0][:10])

    def make_denoiser(self, latent_shape: Sequence[int], preset: str) -> torch.nn.Module:
        from gmpipe.nn.denoiser import CaptionDenoiser

        channels, size = _square(latent_shape)
        return CaptionDenoiser(channels, size, preset, text_dim=self.text_dim)


class Unconditional(Conditioning):
    """No condition: every request (label, prompt or None) gives the same unconditional sample distribution."""

    conditional: ClassVar[bool] = False

    def encode(self, requests: Sequence[Request], device: torch.device | str = "cpu") -> None:
        return None

    def training_conditions(self, split: LatentSplit, latents: Path | None = None) -> ConditionsOf:
        return lambda index: None

    def rows(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> list[Request]:
        return [None]

    def grid_rows(self, latents: Path) -> list[Request]:
        return [None] * 4

    def make_denoiser(self, latent_shape: Sequence[int], preset: str) -> torch.nn.Module:
        from gmpipe.nn.denoiser import UnconditionalDenoiser

        channels, size = _square(latent_shape)
        return UnconditionalDenoiser(channels, size, preset)

