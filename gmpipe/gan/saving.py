"""The GAN networks on disk: a folder with ``config.json`` (the constructor arguments) and ``model.safetensors``
(the weights). Loading checks both and reports a missing or damaged file as one line naming it and the stage that
writes it (``train_gan``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from safetensors.torch import save_file
from torch import nn

from gmpipe.artifacts import load_model_folder, read_json, read_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STAGE = "train_gan"

Network = TypeVar("Network", bound="SavedNetwork")


class SavedNetwork(nn.Module):
    """A module rebuilt from ``to_config()`` (its constructor's keyword arguments, JSON-serialisable)."""

    role = "GAN network"  # how loading errors name it

    def to_config(self) -> dict:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/config.json`` and ``directory/model.safetensors`` (the folder is created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()},
                  directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls: type[Network], directory: str | Path, stage: str = STAGE) -> Network:
        """What ``save_pretrained`` wrote, on the CPU and in eval mode; ``stage`` is the one that writes it."""
        return load_model_folder(lambda folder: cls._load(folder, stage), directory, stage, cls.role,
                                 (CONFIG_FILE, WEIGHTS_FILE))

    @classmethod
    def _load(cls: type[Network], directory: Path, stage: str) -> Network:
        network = read_json(directory / CONFIG_FILE, stage, lambda raw: cls(**raw))
        network.load_state_dict(read_safetensors(directory / WEIGHTS_FILE, stage))  # a mismatch: one line too
        return network.eval()
