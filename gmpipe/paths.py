"""Where each stage reads and writes, relative to one project root (the DVC repo)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def name(self, path: Path) -> str:
        """``path`` as the user sees it from the project root (``data/prepared``), for messages and fingerprints."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def latents(self) -> Path:
        return self.root / "data" / "latents"

    @property
    def models(self) -> Path:
        """Every trained model folder is under here (each with its ``family.json``)."""
        return self.root / "models"

    @property
    def vae(self) -> Path:
        return self.models / "vae"

    @property
    def ldm(self) -> Path:
        return self.models / "ldm"

    @property
    def student(self) -> Path:
        return self.models / "student"

    @property
    def decoder(self) -> Path:
        """The small decoder distilled from the autoencoder's (``train_decoder``)."""
        return self.models / "decoder"

    @property
    def ar(self) -> Path:
        return self.root / "models" / "ar"

    @property
    def gan(self) -> Path:
        return self.root / "models" / "gan"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def checkpoints(self) -> Path:
        """Training state for resume; persisted by DVC so ``dvc repro`` does not wipe it."""
        return self.root / "checkpoints"
