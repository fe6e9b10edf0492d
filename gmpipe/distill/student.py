"""A distilled student as the distill stage writes it: a latent diffusion model folder (``gmpipe.latent_diffusion``)
plus ``student.json``, which says how it was made and which step counts it was made for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from gmpipe.artifacts import read_json

STUDENT_INFO = "student.json"


class StudentInfo(BaseModel):
    """``student.json``: the method, the step counts it was distilled for, and the guidance weight folded in (plus
    training facts the stage records: time shift, train steps, final loss, teacher folder)."""

    model_config = ConfigDict(extra="allow", strict=True)
    method: str
    steps: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]
    guidance_folded: Annotated[float, Field(allow_inf_nan=False)]


def write_student_info(folder: Path, **info) -> None:
    (Path(folder) / STUDENT_INFO).write_text(json.dumps(StudentInfo.model_validate(info).model_dump(), indent=2))


def read_student_info(folder: Path) -> StudentInfo:
    """``folder/student.json``; a damaged one is one ArtifactError naming it and the 'distill' stage."""
    return read_json(Path(folder) / STUDENT_INFO, "distill", StudentInfo.model_validate)


def student_folders(root: Path) -> list[Path]:
    """Every student folder under ``root`` (``models/student``), in name order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / STUDENT_INFO).is_file())
