"""``models/decoder/``, written by ``train_decoder``: the small decoder (``gmpipe.nn.small_decoder``) and what it
needs to decode::

    config.json, diffusion_pytorch_model.safetensors   the AutoencoderTiny (diffusers format; from_pretrained)
    latent_stats.json    the shift and scale of the latents it reads (copied from data/latents/stats.json)
    decoder.json         what it was distilled from (the autoencoder's weights hash), the latent and image shapes

Only the decoder is trained: the folder's encoder is the smallest AutoencoderTiny allows and is never used (encode
with the autoencoder). In diffusers alone::

    tiny = AutoencoderTiny.from_pretrained("models/decoder")
    images = tiny.decode((z - shift) * scale).sample       # shift, scale (1, c, 1, 1) from latent_stats.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gmpipe.artifacts import ArtifactError, load_model_folder, read_json
from gmpipe.data.latents import LatentStats
from gmpipe.fingerprint import hash_file
from gmpipe.nn.small_decoder import SmallDecoder

STAGE = "train_decoder"
DECODER_INFO = "decoder.json"
LATENT_STATS = "latent_stats.json"
WEIGHTS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
AUTOENCODER_WEIGHTS = "diffusion_pytorch_model.safetensors"


class DecoderInfo(BaseModel):
    """``decoder.json``: the autoencoder it was distilled from (hash of its weights file), shapes, training facts."""

    model_config = ConfigDict(extra="allow", strict=True)
    autoencoder_sha256: str
    latent_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]
    image_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]


def autoencoder_hash(autoencoder: str | Path) -> str:
    """SHA-256 of the autoencoder folder's weights file: which autoencoder a small decoder was distilled from."""
    return hash_file(Path(autoencoder) / AUTOENCODER_WEIGHTS)


def save_small_decoder(folder: str | Path, decoder: SmallDecoder, info: dict, stats_file: Path) -> None:
    """Write the decoder folder (module docstring); ``stats_file`` is copied as ``latent_stats.json``."""
    folder = Path(folder)
    decoder.tiny.to("cpu").save_pretrained(folder, safe_serialization=True)
    # AutoencoderTiny records block_out_channels, which its __init__ does not take, in its config; from_pretrained
    # then warns about it on every load. The decoder's widths are kept as decoder_block_out_channels.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("block_out_channels", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / LATENT_STATS).write_text(Path(stats_file).read_text())
    (folder / DECODER_INFO).write_text(json.dumps(DecoderInfo.model_validate(info).model_dump(), indent=2))


def load_small_decoder(folder: str | Path, autoencoder: str | Path | None = None) -> tuple[SmallDecoder, DecoderInfo]:
    """The decoder in ``folder`` (``models/decoder``) on the CPU in eval mode, and its ``decoder.json``; checked to be
    distilled from ``autoencoder`` (a folder) when one is named, since a decoder of another autoencoder would draw
    the wrong images without a word. A missing, damaged or foreign folder is one ArtifactError naming it."""
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    load = lambda path: AutoencoderTiny.from_pretrained(path, use_safetensors=True).eval()  # noqa: E731
    tiny = load_model_folder(load, folder, STAGE, "small decoder", WEIGHTS_FILES)
    info = read_json(folder / DECODER_INFO, STAGE, DecoderInfo.model_validate)
    if autoencoder is not None and (Path(autoencoder) / AUTOENCODER_WEIGHTS).is_file() \
            and autoencoder_hash(autoencoder) != info.autoencoder_sha256:
        raise ArtifactError(folder, f"distilled from another autoencoder than {autoencoder}", STAGE)
    return wrap_small_decoder(tiny, folder), info


def wrap_small_decoder(tiny, folder: str | Path) -> SmallDecoder:
    """A loaded AutoencoderTiny with the latent statistics of its ``folder``."""
    stats = LatentStats.load(Path(folder) / LATENT_STATS, STAGE)
    try:
        return SmallDecoder(tiny, stats).eval()
    except ValueError as exc:
        raise ArtifactError(Path(folder) / LATENT_STATS, str(exc), STAGE) from None
