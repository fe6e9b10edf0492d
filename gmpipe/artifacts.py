"""Atomic writes: an artifact is either the previous good one or the complete new one, never half-written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gmpipe.errors import GmpipeError

# Failures of the storage itself (full disk, quota, read-only or unwritable folder, I/O error): reported as one
# clear line, with the promise the atomic write keeps.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO}


def _write_failed(target: Path, exc: OSError) -> GmpipeError:
    return GmpipeError(
        f"{target}: could not be written ({exc.strerror or exc}); the previous version, if any, is intact"
    )


def recover_interrupted(target: Path) -> None:
    """A run killed between the two renames of ``atomic_dir`` leaves only the backup: put it back."""
    if target.exists():
        return
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups:
        os.replace(backups[-1], target)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target``, on failure ``target`` is untouched."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are ordinary folders
    except OSError as exc:
        raise _write_failed(target, exc) from None
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in WRITE_ERRORS:
            raise _write_failed(target, exc) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, backup)
    os.replace(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``target`` for writing; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; artifacts are ordinary files
    except OSError as exc:
        raise _write_failed(target, exc) from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            raise _write_failed(target, exc) from None
        raise


def write_json(path: str | Path, payload: object) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_file(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
