"""The autoregressive prior: a transformers causal LM (GPT-2 architecture, built from a small config, never
downloaded) over latent tokens with a class prefix.

Vocabulary (one table of ``bins + num_classes + 1`` embeddings)::

    [0, bins)                  value tokens: bin j of the channel at that position (gmpipe.ar.tokenizer)
    bins + y, y < num_classes  the prefix of class y
    bins + num_classes         the prefix of the null class (classifier-free guidance; label ``null_label``)

A latent's tokens x_0..x_{L-1} are modelled as p(x | y) = prod_t p(x_t | x_<t, y): the network reads
[prefix(y), x_0, ..., x_{L-2}] (L positions) and its output at position t gives p(x_t | x_<t, y). The class prefix
doubles as the start token, so there is no separate BOS. Only the first ``bins`` logits are ever used: p(x_t | .)
is the softmax over the value tokens alone, so no probability is spent on prefixes that never follow.

The class enters twice: as the prefix (the start of the sequence) and, with ``class_every_position`` (the default
for new models), added to the input embedding of every position (the prefix token's own embedding), so every
position reads its class directly rather than through attention back to position 0. In short CPU runs that is what
makes samples follow their class (README, "Autoregressive prior"). Both stay a proper autoregressive model: the
class is known before x_0, so p(x | y) = prod_t p(x_t | x_<t, y) still holds exactly.

GPT-2's learned absolute position embeddings tell each position which channel and which latent pixel it holds;
that matters here because token j means a different value in each channel. Text conditioning (caption embeddings
as a projected prefix through ``inputs_embeds``) is the documented extension, not built yet.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gmpipe.artifacts import load_model_folder, read_json, write_json
from gmpipe.nn.presets import AR_PRESETS, ARPreset, get_ar_preset
from gmpipe.precision import computes_in_half

MODEL_FOLDER = "lm"
CONFIG_FILE = "ar.json"

__all__ = ["AR_PRESETS", "ARFile", "ARPreset", "LatentAR", "build_causal_lm", "get_ar_preset"]


class ARFile(BaseModel):
    """``ar.json``: the token layout the language model was built for."""

    model_config = ConfigDict(extra="forbid", strict=True)
    bins: Annotated[int, Field(ge=2)]
    num_classes: Annotated[int, Field(ge=1)]
    sequence_length: Annotated[int, Field(ge=1)]
    preset: dict
    dropout: Annotated[float, Field(ge=0, lt=1)]
    class_every_position: bool = False  # folders written before it existed read the class at the prefix only


ACTIVATION = "gelu"  # of models built now (GPT2Config.activation_function)

# The attention every LatentAR's language model runs (transformers' attention registry; not saved with the model, so a
# saved folder loads anywhere with transformers' own "sdpa"). It is transformers' SDPA attention, in float32 while
# training in half precision on a CPU: PyTorch's fused CPU attention runs its backward 1.7x slower in bfloat16 than
# in float32 at the demo's 4 heads of 32 over 256 positions (forward + backward, batch 32: 44 vs 25 ms), so the
# demo's bf16 train_ar step took 1.15x as long as with the attention in float32 (README, Performance).
ATTENTION = "gmpipe_sdpa"


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and torch.is_grad_enabled() and computes_in_half(query):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()  # an additive mask in the inputs' precision
        with torch.autocast("cpu", enabled=False):
            output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                     attention_mask, **kwargs)
        return output.to(query.dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _attention_registry():
    """transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` with its SDPA mask builder, or None for a
    transformers without them (or without the SDPA attention function ``_attention`` runs)."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations import sdpa_attention  # noqa: F401 (what _attention runs)
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return None
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def with_gmpipe_attention(lm):
    """``lm`` (a transformers model) running :data:`ATTENTION`; returns ``lm``. A transformers without the attention
    registry (before 4.5x; gmpipe accepts 4.40 on) keeps its own attention: the same model, the slower bf16 step."""
    registry = _attention_registry()
    if registry is None or not hasattr(lm, "set_attn_implementation"):
        return lm
    attentions, masks, sdpa_mask = registry
    attentions.register(ATTENTION, _attention)
    masks.register(ATTENTION, sdpa_mask)  # the masks "sdpa" gets (an unknown name would get none: padding dropped)
    lm.set_attn_implementation(ATTENTION)
    return lm


def build_causal_lm(preset: ARPreset, vocab_size: int, positions: int, dropout: float = 0.0):
    """A randomly initialised GPT2LMHeadModel of the given sizes (input and output embeddings tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=positions, n_embd=preset.width, n_layer=preset.layers,
        n_head=preset.heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        # exact GELU, not GPT-2's tanh approximation ("gelu_new", within 5e-4 of it): on a CPU the approximation
        # costs 4x the exact kernel, and transformers' "gelu_new" runs it as separate elementwise ops, a quarter of
        # the demo's bf16 train_ar step (``python -m bench.cpu_kernels``); a saved model keeps its own activation
        activation_function=ACTIVATION,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # GPT-2's defaults (50256) lie outside this vocabulary
    )
    return with_gmpipe_attention(GPT2LMHeadModel(config))


class LatentAR(nn.Module):
    """p(x_t | x_<t, y) over value tokens; see the module docstring.

    ``forward(tokens (B, L), labels (B,)) -> value logits (B, L, bins)`` with teacher forcing: logits[:, t] give
    p(x_t | x_<t, y). labels are class indices in [0, num_classes]; ``null_label == num_classes`` is the null class.
    ``next_logits`` runs positions incrementally on the key/value cache for sampling. ``class_every_position``:
    the class embedding is also added at every position (module docstring).
    """

    def __init__(self, bins: int, num_classes: int, sequence_length: int, preset: str | ARPreset = "small",
                 dropout: float = 0.0, class_every_position: bool = True) -> None:
        super().__init__()
        if bins < 2 or num_classes < 1 or sequence_length < 1:
            raise ValueError(f"need bins >= 2, num_classes >= 1, sequence_length >= 1 (got {bins}, {num_classes}, "
                             f"{sequence_length})")
        self.bins = bins
        self.num_classes = num_classes
        self.null_label = num_classes
        self.sequence_length = sequence_length
        self.preset = get_ar_preset(preset)
        self.dropout = dropout
        self.class_every_position = class_every_position
        self.lm = build_causal_lm(self.preset, self.vocab_size, sequence_length, dropout)
        # The cache keyword of the model's forward: ``cache`` in recent transformers, ``past_key_values`` before.
        self._cache_keyword = "cache" if "cache" in inspect.signature(self.lm.forward).parameters \
            else "past_key_values"

    @property
    def vocab_size(self) -> int:
        return self.bins + self.num_classes + 1

    def check_labels(self, labels: Tensor) -> None:
        """Refuse labels outside [0, num_classes] (called where labels come from a caller, not in the training step,
        where the check would cost a device sync per step)."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null class)")

    def prefix_tokens(self, labels: Tensor) -> Tensor:
        """Class labels (B,) in [0, num_classes] -> prefix tokens (B, 1)."""
        return (labels.long() + self.bins)[:, None]

    def input_ids(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """The teacher-forced input [prefix(y), x_0, ..., x_{L-2}], (B, L)."""
        return torch.cat([self.prefix_tokens(labels).to(tokens.device), tokens[:, :-1]], dim=1)

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Value logits (B, L, bins): logits[:, t] parameterise p(x_t | x_<t, y) for tokens (B, L), labels (B,)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.sequence_length:
            raise ValueError(f"expected tokens (B, {self.sequence_length}), got {tuple(tokens.shape)}")
        embeds = self.input_embeddings(self.input_ids(tokens, labels), labels)
        logits = self.lm(inputs_embeds=embeds, use_cache=False).logits
        return logits[..., : self.bins]

    def input_embeddings(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Token embeddings (B, n, width) of ``input_ids`` (B, n), plus the embedding of the class prefix of
        ``labels`` (B,) at every position when the model reads its class there (GPT-2 adds the positions)."""
        table = self.lm.transformer.wte
        embeds = table(input_ids)
        if self.class_every_position:
            embeds = embeds + table(self.prefix_tokens(labels).to(input_ids.device))  # (B, 1, width) on every row
        return embeds

    def next_logits(self, input_ids: Tensor, labels: Tensor, cache=None) -> tuple[Tensor, object]:
        """Value logits (B, bins) for the token after ``input_ids`` (B, n) of sequences of class ``labels`` (B,),
        and the updated key/value cache.

        With a cache holding the first positions, ``input_ids`` holds only the new ones (one position per sampling
        step, so each step costs one forward of one position); with ``cache=None`` it is the whole prefix.
        """
        embeds = self.input_embeddings(input_ids, labels)
        output = self.lm.transformer(inputs_embeds=embeds, use_cache=True, **{self._cache_keyword: cache})
        cache = getattr(output, self._cache_keyword, None)
        # the output layer in float32 even under autocast (the blocks may run bfloat16): logits rounded to bf16
        # would move each sampling probability by up to ~4%; the last position only, as sampling needs
        hidden = output.last_hidden_state[:, -1].float()
        with torch.autocast(hidden.device.type, enabled=False):
            return self.lm.lm_head(hidden)[:, : self.bins], cache

    def sampling_cache(self):
        """An empty key/value cache for ``next_logits`` with room for the whole sequence (the prefix and L - 1
        tokens), allocated once (``gmpipe.ar.kv_cache``)."""
        from gmpipe.ar.kv_cache import preallocated_cache

        return preallocated_cache(self.lm.config.n_layer, self.sequence_length)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in the backward pass instead of storing its activations (the loop's hook)."""
        self.lm.gradient_checkpointing_enable()

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def to_config(self) -> dict:
        return {"bins": self.bins, "num_classes": self.num_classes, "sequence_length": self.sequence_length,
                "preset": asdict(self.preset), "dropout": self.dropout,
                "class_every_position": self.class_every_position}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/lm`` (the transformers model, safetensors) and ``directory/ar.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory / MODEL_FOLDER, safe_serialization=True)
        write_json(directory / CONFIG_FILE, self.to_config())

    @classmethod
    def from_pretrained(cls, directory: str | Path, stage: str = "train_ar") -> LatentAR:
        """Load what ``save_pretrained`` wrote (safetensors only, local files only), on the CPU in eval mode. A
        missing or damaged file is one ArtifactError naming it and ``stage``, the stage that writes the folder."""
        required = (CONFIG_FILE, f"{MODEL_FOLDER}/config.json", f"{MODEL_FOLDER}/model.safetensors")
        return load_model_folder(lambda folder: cls._load(folder, stage), directory, stage,
                                 "autoregressive prior", required)

    @classmethod
    def _load(cls, directory: Path, stage: str) -> LatentAR:
        from transformers import GPT2LMHeadModel

        config = read_json(directory / CONFIG_FILE, stage, ARFile.model_validate)
        with torch.device("meta"):  # a shell without random init: its language model is replaced below
            model = cls(config.bins, config.num_classes, config.sequence_length, ARPreset(**config.preset),
                        config.dropout, config.class_every_position)
        lm = GPT2LMHeadModel.from_pretrained(directory / MODEL_FOLDER, use_safetensors=True, local_files_only=True)
        if lm.config.vocab_size != model.vocab_size or lm.config.n_positions < config.sequence_length:
            raise ValueError(f"{MODEL_FOLDER}/config.json has vocab_size {lm.config.vocab_size} and n_positions "
                             f"{lm.config.n_positions}; {CONFIG_FILE} needs {model.vocab_size} and "
                             f">= {config.sequence_length}")
        model.lm = with_gmpipe_attention(lm)
        return model.eval()
