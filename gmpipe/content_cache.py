"""Tensors kept across runs, found by what made them: a result that depends on no trained model (the real images'
features, a classifier trained on the real data) is computed once per content, not once per ``dvc repro``.

An entry is one safetensors file ``<root>/<kind>/<digest>.safetensors``, ``digest`` that of the
:class:`~gmpipe.fingerprint.Fingerprint` that made it (the settings that shape the result; the content hashes of
the data it reads, of the code that computes it, of the library versions). The file's metadata holds that whole
fingerprint and the SHA-256 of the tensors, so an entry is trusted only when it parses, its fingerprint equals the
one asked for, and its tensors still hash to what was written; anything else (a truncated or edited file, a
digest collision, a file from another gmpipe) is ignored, rebuilt and replaced. Entries are written atomically;
the four most recently written of each kind are kept.

Where: ``$GMPIPE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/gmpipe``, else ``~/.cache/gmpipe``. ``GMPIPE_CACHE=off``
(or ``0``, ``false``, ``no``) turns the cache off: every result is computed, nothing is read or written. Clearing
it is deleting the folder; a cache that cannot be written (read-only, full disk) only costs the recomputation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from gmpipe.artifacts import atomic_file
from gmpipe.errors import GmpipeError
from gmpipe.fingerprint import Fingerprint, hash_tensors

CACHE_DIR_VARIABLE, SWITCH_VARIABLE = "GMPIPE_CACHE_DIR", "GMPIPE_CACHE"
KEEP = 4  # entries kept per kind, the most recently written
_OFF = {"off", "0", "false", "no"}

Tensors = dict[str, torch.Tensor]


def cache_root(environment: dict[str, str] | None = None) -> Path | None:
    """The cache folder the environment names (module docstring), or None when the cache is switched off."""
    environment = os.environ if environment is None else environment
    if environment.get(SWITCH_VARIABLE, "").strip().lower() in _OFF:
        return None
    if environment.get(CACHE_DIR_VARIABLE):
        return Path(environment[CACHE_DIR_VARIABLE]).expanduser()
    base = environment.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "gmpipe"


class ContentCache:
    """Entries of tensors under ``root`` (None: off, nothing read or written); ``log`` gets one line per entry
    read, rebuilt or not written."""

    def __init__(self, root: Path | None, log: Callable[[str], None] | None = None, keep: int = KEEP) -> None:
        self.root = None if root is None else Path(root)
        self._log = log or (lambda line: None)
        self.keep = keep

    @classmethod
    def from_environment(cls, log: Callable[[str], None] | None = None) -> ContentCache:
        return cls(cache_root(), log)

    def path(self, kind: str, fingerprint: Fingerprint) -> Path:
        if self.root is None:
            raise ValueError("the cache is off")
        return self.root / kind / f"{fingerprint.digest}.safetensors"

    def load(self, kind: str, fingerprint: Fingerprint) -> Tensors | None:
        """The tensors stored for ``fingerprint``, or None when there is no trustworthy entry (module docstring)."""
        if self.root is None:
            return None
        file = self.path(kind, fingerprint)
        try:
            if not file.is_file():
                return None
        except OSError:  # an unreadable cache folder holds nothing to trust
            return None
        problem = _problem(file, fingerprint)
        if isinstance(problem, str):
            self._log(f"cache: ignoring {file} ({problem}); computing it again")
            return None
        self._log(f"cache: {kind} from {file}")
        return problem

    def store(self, kind: str, fingerprint: Fingerprint, tensors: Tensors) -> None:
        """Write the entry (replacing any); a cache that cannot be written is logged and left alone."""
        if self.root is None:
            return
        file = self.path(kind, fingerprint)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        metadata = {"fingerprint": json.dumps(fingerprint.to_dict(), sort_keys=True),
                    "tensors_sha256": hash_tensors(tensors)}
        try:
            with atomic_file(file, "wb") as handle:
                handle.write(save(tensors, metadata=metadata))
        except (OSError, GmpipeError) as exc:
            self._log(f"cache: could not write {file} ({exc}); the next run computes {kind} again")
            return
        self._prune(file.parent)

    def _prune(self, folder: Path) -> None:
        """Keep the ``keep`` most recently written entries of a kind: each change of data, settings or code writes a
        new one, and the older ones are then rarely asked for again."""
        try:
            entries = sorted(folder.glob("*.safetensors"), key=lambda entry: entry.stat().st_mtime, reverse=True)
            for entry in entries[self.keep:]:
                entry.unlink(missing_ok=True)
        except OSError:
            pass

    def get_or_compute(self, kind: str, fingerprint: Fingerprint, compute: Callable[[], Tensors],
                       fits: Callable[[Tensors], bool] = lambda tensors: True) -> tuple[Tensors, bool]:
        """(the tensors, whether they came from the cache): the stored entry if trustworthy and ``fits`` it (the
        caller's check of names and shapes), else ``compute()``, stored for the next run."""
        found = self.load(kind, fingerprint)
        if found is not None:
            if fits(found):
                return found, True
            self._log(f"cache: ignoring {self.path(kind, fingerprint)} (not the tensors expected); computing it again")
        tensors = compute()
        self.store(kind, fingerprint, tensors)
        return tensors, False


def _problem(file: Path, fingerprint: Fingerprint) -> Tensors | str:
    """The entry's tensors if it is trustworthy for ``fingerprint``, else what is wrong with it."""
    try:
        raw = file.read_bytes()
        tensors = load(raw)
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_size]).get("__metadata__") or {}
    except (OSError, SafetensorError, ValueError, json.JSONDecodeError) as exc:
        return f"unreadable: {exc}"
    try:
        stored = Fingerprint.from_dict(json.loads(metadata.get("fingerprint", "null")))
    except json.JSONDecodeError:
        stored = None
    if stored is None or stored.digest != fingerprint.digest:
        return "made by other settings, data or code"
    if hash_tensors(tensors) != metadata.get("tensors_sha256"):
        return "its tensors do not match their recorded hash"
    return tensors
