"""A small CNN classifier, trained on the real data, that scores class-conditional samples.

Its accuracy on generated images of class y (how often the classifier agrees with the requested label) measures
conditioning fidelity; its accuracy on the held-out real set is the ceiling to compare against.
Images follow the gmpipe convention: float tensors in [-1, 1], shape (N, C, H, W), C = 1 or 3, 28-64 px.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm

from gmpipe.artifacts import atomic_file, load_model_folder, read_json, read_safetensors
from gmpipe.config.base import Precision
from gmpipe.precision import bf16_autocast

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int
    num_classes: int
    width: int = 32  # a multiple of 8 (GroupNorm groups)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: short training runs leave no well-settled running statistics to rely on.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (widths w, 2w, 2w, 4w; the last three halve the resolution), global average pooling
    and a linear head: images (B, C, H, W) -> logits (B, num_classes). Any H, W >= 8."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Sequential(
            _conv_block(config.in_channels, w, stride=1),
            _conv_block(w, 2 * w, stride=2),
            _conv_block(2 * w, 2 * w, stride=2),
            _conv_block(2 * w, 4 * w, stride=2),
        )
        self.head = nn.Linear(4 * w, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
    width: int = 32,
    device: torch.device | str = "cpu",
    precision: Precision = "fp32",
) -> SmallCNN:
    """Train a ``SmallCNN`` with AdamW and cross-entropy on images (N, C, H, W) in [-1, 1], labels (N,).

    Batches are drawn uniformly with replacement. Initialisation and batches depend only on ``seed`` (the global
    RNG is left untouched). The model trains on ``device`` (the data stays on the CPU; each batch is moved), its
    forward passes under bfloat16 autocast when ``precision`` is "bf16" (weights, gradients and the optimizer stay
    float32). Returns the model in eval mode, on ``device``; it predicts in float32 either way.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) != len(labels):
        raise ValueError(
            f"expected images (N, 1|3, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    labels = torch.as_tensor(labels, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(ClassifierConfig(in_channels=images.shape[1], num_classes=num_classes, width=width))
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for _ in bar:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        with bf16_autocast(device, precision == "bf16"):
            logits = model(images[index].to(device).float())
        loss = F.cross_entropy(logits.float(), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class (N,) on the CPU for images (N, C, H, W), run on the model's device in eval mode (the model's
    mode is restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return torch.cat(
            [
                model(images[start : start + batch_size].to(device).float()).argmax(dim=1).cpu()
                for start in range(0, len(images), batch_size)
            ]
        )
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of images (N, C, H, W) whose predicted class equals labels (N,)."""
    return (predict(model, images, batch_size) == torch.as_tensor(labels)).double().mean().item()


def save_classifier(model: SmallCNN, directory: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_file(directory / WEIGHTS_FILE, "wb") as handle:
        handle.write(save(state))
    with atomic_file(directory / CONFIG_FILE) as handle:
        handle.write(json.dumps(asdict(model.config), indent=2) + "\n")


def load_classifier(directory: str | Path) -> SmallCNN:
    """Rebuild a ``SmallCNN`` saved by ``save_classifier`` (the ``evaluate`` stage); returned in eval mode. A missing
    or damaged file is one :class:`~gmpipe.artifacts.ArtifactError` naming it."""

    def load(folder: Path) -> SmallCNN:
        config = read_json(folder / CONFIG_FILE, "evaluate", lambda raw: ClassifierConfig(**raw))
        model = SmallCNN(config)
        model.load_state_dict(read_safetensors(folder / WEIGHTS_FILE, "evaluate"))
        return model.eval()

    return load_model_folder(load, directory, "evaluate", "classifier", (CONFIG_FILE, WEIGHTS_FILE))
