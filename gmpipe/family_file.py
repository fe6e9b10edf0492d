"""``family.json``: the file that makes a folder a model folder. It names the model family (a name in
``gmpipe.registry.MODEL_FAMILIES``) and the stage that writes the folder::

    {"family": "latent_diffusion", "stage": "train_ldm"}

Kept apart from ``gmpipe.generator`` (which loads a folder as its family's Generator) so that a stage can mark its
output as a model folder without importing the code of any family, and so without its checkpoints depending on
that code (``gmpipe.fingerprint.code_hashes``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gmpipe.registry import MODEL_FAMILIES

FAMILY_FILE = "family.json"


class FamilyFile(BaseModel):
    """``family.json``: the model family (a ``MODEL_FAMILIES`` name) and the stage that writes the folder."""

    model_config = ConfigDict(extra="allow", strict=True)
    family: str
    stage: str


def write_family_file(folder: Path, family: str, stage: str) -> None:
    """Record in ``folder`` that it holds a model of ``family`` (a registered name), written by ``stage``."""
    if family not in MODEL_FAMILIES:  # checked by name: the family's code is not imported here
        raise ValueError(f"unknown model family {family!r}; choose one of {list(MODEL_FAMILIES.names)}")
    (Path(folder) / FAMILY_FILE).write_text(json.dumps({"family": family, "stage": stage}, indent=2))


def find_model_folders(models: str | Path) -> list[Path]:
    """Every model folder under ``models`` (``models/``): the folders with a ``family.json`` one or two levels
    down (``models/ldm``, ``models/student/reflow``), in path order. Hidden folders (an interrupted atomic write's
    ``.NAME.tmp-...``) are not models."""
    models = Path(models)
    if not models.is_dir():
        return []
    found = [*models.glob(f"*/{FAMILY_FILE}"), *models.glob(f"*/*/{FAMILY_FILE}")]
    return sorted(file.parent for file in found if file.is_file()
                  and not any(part.startswith(".") for part in file.relative_to(models).parts))
