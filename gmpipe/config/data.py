"""``data:`` where the images come from and the shape every stage sees."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from gmpipe.config.base import Section

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DataConfig(Section):
    source: Literal["fashion_mnist", "image_folder"] = "fashion_mnist"
    path: str = FASHION_MNIST_DIR
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    channels: Literal[1, 3] = 1
