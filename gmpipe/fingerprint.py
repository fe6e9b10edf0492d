"""What produced a result: the settings that define it and the content hashes of its inputs.

A checkpoint or a cache is reused only when its fingerprint equals the one the current run would write (the
same rule DVC applies to whole stages through ``dvc.lock``). Settings that only say how long or how often (the
number of steps under a constant learning rate, checkpoint and log intervals: ``gmpipe.config.loop.resumable_keys``)
are left out by the caller, so raising ``steps`` there continues a run; everything else that changes the result is
in, so a changed setting or upstream artifact starts over.

Settings are flat ``{"section.key": value}`` maps (the names a user knows from ``params.yaml``); inputs are
``{"path/as/the/user/sees/it": sha256}``. :meth:`Fingerprint.changes` says, in those names, what differs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

_CHUNK = 1 << 20


def hash_file(path: Path, digest=None) -> str:
    """SHA-256 of one file's bytes (or feed them into ``digest`` and return its hex value)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(path: str | Path) -> str:
    """SHA-256 over every file under ``path`` (relative name and bytes, in sorted order); a file hashes alone.

    Hidden entries (temporary files of interrupted atomic writes) are skipped. A missing path hashes to
    ``"missing"``, so a fingerprint can still be compared and says that the input disappeared.
    """
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                           for part in p.relative_to(path).parts))
    for file in files:
        name = file.relative_to(path).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        hash_file(file, digest)
    return digest.hexdigest()


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values (e.g. the weights of a previous student)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-d too
    return digest.hexdigest()


def _module_file(root: Path, name: str) -> Path | None:
    """The source file of module ``name`` under the folder ``root`` that holds its package (None: not a module,
    e.g. a function imported by name)."""
    base = root.joinpath(*name.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.is_file():
            return file
    return None


def _imported_modules(file: Path, package: str) -> set[str]:
    """Every ``package.*`` module ``file`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == package:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # submodules imported by name
    return found


def code_hashes(module: str) -> dict[str, str]:
    """``{"gmpipe/...py": sha256}`` of ``module`` and every module of its package it imports, transitively.

    This is the code that computes a stage's result; a checkpoint written by other code is not reused (DVC too
    reruns a stage whose code deps changed). Found by reading the import statements, so the set does not depend on
    what else the process happened to import.
    """
    package = module.split(".")[0]
    root = Path(importlib.util.find_spec(package).origin).parent.parent
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        file = _module_file(root, name)
        if file is None:
            continue
        seen[name] = file
        pending.extend(_imported_modules(file, package) - set(seen))
        for parent in range(1, name.count(".") + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            pending.append(name.rsplit(".", parent)[0])
    return {file.relative_to(root).as_posix(): hash_file(file) for file in sorted(set(seen.values()))}


def section_settings(section: str, config, exclude: Iterable[str] = ()) -> dict[str, object]:
    """A params section (a pydantic model) as ``{"section.key": value}``, without the keys in ``exclude``."""
    values = json.loads(config.model_dump_json())
    skipped = set(exclude)
    return {f"{section}.{key}": value for key, value in values.items() if key not in skipped}


def _short(value: object, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Fingerprint:
    settings: dict[str, object] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "inputs": self.inputs, "digest": self.digest}

    @classmethod
    def from_dict(cls, raw: object) -> Fingerprint | None:
        """The fingerprint stored in a checkpoint or cache, or None when it has none (or an unreadable one)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("settings"), dict) \
                or not isinstance(raw.get("inputs"), dict):
            return None
        return cls(dict(raw["settings"]), {str(k): str(v) for k, v in raw["inputs"].items()})

    @property
    def digest(self) -> str:
        payload = json.dumps({"settings": self.settings, "inputs": self.inputs}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def with_settings(self, **settings: object) -> Fingerprint:
        return Fingerprint({**self.settings, **settings}, dict(self.inputs))

    def with_inputs(self, **inputs: str) -> Fingerprint:
        return Fingerprint(dict(self.settings), {**self.inputs, **inputs})

    def changes(self, stored: Fingerprint | None) -> list[str]:
        """What differs from ``stored``, one short phrase per key or input (empty when they match)."""
        if stored is None:
            return ["the checkpoint records no fingerprint (written by an older gmpipe)"]
        found = []
        for key in sorted(set(self.settings) | set(stored.settings)):
            old, new = stored.settings.get(key, "(unset)"), self.settings.get(key, "(unset)")
            if old != new:
                found.append(f"{key} changed ({_short(old)} -> {_short(new)})")
        for name in sorted(set(self.inputs) | set(stored.inputs)):
            if stored.inputs.get(name) != self.inputs.get(name):
                found.append(f"{name} changed")
        return found


def describe_changes(changes: list[str], limit: int = 3) -> str:
    """``a, b, c and 2 more`` for a one-line message."""
    shown = ", ".join(changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")
