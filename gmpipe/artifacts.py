"""gmpipe's own artifacts: written atomically, read back checked.

Writing: an artifact is either the previous good one or the complete new one, never half-written.

Reading: every loader of a stage output goes through the readers below, so a missing, truncated, tampered or hostile
file becomes one :class:`ArtifactError` line that names the file and the stage that writes it again, e.g.
``data/latents/stats.json: not valid JSON (truncated? ...); rerun the 'cache_latents' stage``. Reads are bounded:
a JSON file is read only up to a size limit, a safetensors file is checked by the safetensors library against its
own size, an ``.npz`` member is read only when the shape its header declares fits in the bytes the archive holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gmpipe.errors import GmpipeError

# Failures of the storage itself (full disk, quota, read-only or unwritable folder, I/O error): reported as one
# clear line, with the promise the atomic write keeps.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO}


def _write_failed(target: Path, exc: OSError) -> GmpipeError:
    error = GmpipeError(
        f"{target}: could not be written ({exc.strerror or exc}); the previous version, if any, is intact"
    )
    error.reason = exc.strerror or str(exc)  # for writers that say more about what is kept
    return error


def _owner_tag() -> str:
    """Host and process id, in the names of temporary and backup folders: a folder whose writer died on this host
    can be recognised and removed, and one of a live writer (or of another host sharing the volume) is left."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _writer_died(folder: Path) -> bool:
    """True when ``folder`` (``.NAME.tmp-HOST-PID-...`` or ``.NAME.old-HOST-PID-...``) was left by a dead process
    of this host."""
    parts = folder.name.rsplit("-", 3)
    if len(parts) != 4 or parts[1] != socket.gethostname().replace("-", "_") or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@contextlib.contextmanager
def _swap_lock(parent: Path) -> Iterator[None]:
    """An exclusive lock on ``parent`` while a folder in it is swapped, so two runs writing the same artifact
    replace it one after the other instead of interleaving their renames. Best effort: where the file system has
    no ``flock`` (some network mounts), the swap below still copes with a concurrent writer."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def recover_interrupted(target: Path) -> None:
    """Repair what a killed ``atomic_dir`` left: put the backup back if a run died between its two renames, and
    remove temporary and backup folders of writers that died on this host. Call with the swap lock held."""
    leftovers = list(target.parent.glob(f".{target.name}.old-*"))
    if not target.exists() and leftovers:
        newest = max(leftovers, key=lambda p: p.stat().st_mtime)
        os.replace(newest, target)
        leftovers.remove(newest)
    for folder in leftovers + list(target.parent.glob(f".{target.name}.tmp-*")):
        if _writer_died(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, moving the current ``target`` aside first and deleting it afterwards."""
    backup = target.parent / f".{target.name}.old-{_owner_tag()}-{os.urandom(4).hex()}"
    with _swap_lock(target.parent):
        recover_interrupted(target)
        for _ in range(100):  # with the lock held, once; without it, until no concurrent writer gets in between
            with contextlib.suppress(FileNotFoundError):
                os.replace(target, backup)
            try:
                os.replace(tmp, target)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(backup, ignore_errors=True)
        else:
            raise OSError(errno.EBUSY, "another run keeps replacing it")
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target``, on failure ``target`` is untouched.

    Runs writing the same target at the same time both succeed, one after the other: the folder is always one
    complete version (the last to finish), and no temporary or backup folder is left behind.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _swap_lock(target.parent):
            recover_interrupted(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are ordinary folders
    except OSError as exc:
        raise _write_failed(target, exc) from None
    try:
        yield tmp
        _swap_in(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in WRITE_ERRORS or exc.errno == errno.EBUSY:
            raise _write_failed(target, exc) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``target`` for writing; rename it over ``target`` only if the block succeeds.

    The one atomic file write of gmpipe. The new file keeps the permissions of the one it replaces (0o644 for a new
    one: mkstemp would make it private)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        permissions = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.chmod(tmp, permissions)
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


# Reading.

T = TypeVar("T")

# Every JSON artifact gmpipe writes is small (the largest, data/latents/captions.json, holds the distinct captions).
MAX_JSON_BYTES = 256 * 2**20
# Exceptions a parser of an artifact's content raises on content it does not expect (pydantic's ValidationError
# is a ValueError).
CONTENT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


class ArtifactError(GmpipeError):
    """One of gmpipe's own files is missing or unusable; the message names it and the stage that rewrites it."""

    def __init__(self, path: str | Path, problem: str, stage: str, missing: bool = False):
        remedy = f"run the '{stage}' stage first" if missing else f"rerun the '{stage}' stage"
        super().__init__(f"{path}: {one_line(problem)}; {remedy}")
        self.path, self.stage = Path(path), stage


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters (messages quote file content; it can be anything)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """A parser's complaint in a few words: the first pydantic error with its location, or the exception text."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            return f"{where}: {message}" if where else message
        except (TypeError, IndexError, KeyError):
            pass
    if isinstance(exc, KeyError):
        return f"missing key {exc}"
    return f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)


def require_file(path: str | Path, stage: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "missing", stage, missing=True)
    return path


def parse_content(path: str | Path, stage: str, parse: Callable[[Any], T], raw: Any) -> T:
    """``parse(raw)``, with any complaint about the content reported against ``path``."""
    try:
        return parse(raw)
    except CONTENT_ERRORS as exc:
        raise ArtifactError(path, f"unexpected content ({describe(exc)})", stage) from None


def read_json(path: str | Path, stage: str, parse: Callable[[Any], T] | None = None, expect: type = dict,
              max_bytes: int = MAX_JSON_BYTES) -> T | Any:
    """A JSON artifact: its top-level value must be an ``expect``; ``parse`` (e.g. a pydantic model's
    ``model_validate``) checks and converts it."""
    path = require_file(path, stage)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ArtifactError(path, f"cannot be read ({exc.strerror or exc})", stage) from None
    if len(data) > max_bytes:
        raise ArtifactError(path, f"larger than {max_bytes} bytes, not a file gmpipe wrote", stage)
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(path, "not UTF-8 text", stage) from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(path, f"not valid JSON (truncated? {exc.msg} at line {exc.lineno})", stage) from None
    except RecursionError:
        raise ArtifactError(path, "JSON nested too deeply", stage) from None
    if not isinstance(raw, expect):
        raise ArtifactError(path, f"expected a JSON {expect.__name__}, found {type(raw).__name__}", stage)
    return raw if parse is None else parse_content(path, stage, parse, raw)


def read_safetensors(path: str | Path, stage: str, keys: Sequence[str] = ()) -> dict:
    """Tensors of a safetensors artifact (CPU), with ``keys`` required."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require_file(path, stage)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(path, f"not a readable safetensors file (truncated? {describe(exc)})", stage) from None
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise ArtifactError(path, f"has no tensor {missing[0]!r}", stage)
    return tensors


def read_npz(path: str | Path, stage: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an uncompressed ``.npz`` artifact (what ``np.savez`` writes), without pickles.

    Each member's ``.npy`` header is checked first: the bytes its shape and dtype declare must be the bytes the
    archive stores, so a truncated or forged member is refused before anything is allocated for it.
    """
    path = require_file(path, stage)
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            for key in keys:
                info = members.get(key)
                if info is None:
                    raise ArtifactError(path, f"has no array {key!r}", stage)
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ArtifactError(path, f"array {key!r} is compressed; gmpipe writes plain .npz files", stage)
                with archive.open(info) as member:
                    arrays[key] = _read_npy_member(member, info.file_size, path, key, stage)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise ArtifactError(path, f"not a readable .npz archive (truncated? {describe(exc)})", stage) from None
    return arrays


def _read_npy_member(member, stored_bytes: int, path: Path, key: str, stage: str) -> np.ndarray:
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(member)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ArtifactError(path, f"array {key!r} has a broken header ({describe(exc)})", stage) from None
    if dtype.hasobject:
        raise ArtifactError(path, f"array {key!r} holds Python objects; gmpipe never unpickles", stage)
    declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    available = stored_bytes - member.tell()
    if declared != available:
        raise ArtifactError(path, f"array {key!r} declares {declared} bytes of data but holds {available}", stage)
    data = member.read(declared)
    if len(data) != declared:
        raise ArtifactError(path, f"array {key!r} is truncated", stage)
    array = np.frombuffer(data, dtype=dtype)
    order = "F" if fortran_order else "C"
    return array.reshape(shape, order=order).copy() if shape else array.reshape(())


def load_model_folder(load: Callable[[Path], T], folder: str | Path, stage: str, what: str,
                      required: Sequence[str] = ("config.json",)) -> T:
    """``load(folder)`` for a saved model (e.g. diffusers' ``from_pretrained``), with the folder and its
    ``required`` files checked first and any loading failure reported as one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(folder, f"no {what} here", stage, missing=True)
    for name in required:
        if not (folder / name).is_file():
            raise ArtifactError(folder / name, f"missing from the {what} folder", stage)
    from safetensors import SafetensorError

    try:
        return load(folder)
    except GmpipeError:
        raise
    except SafetensorError as exc:
        raise ArtifactError(folder, f"the {what} weights are unreadable (truncated? {exc})", stage) from None
    except (*CONTENT_ERRORS, OSError, RuntimeError, EOFError) as exc:
        raise ArtifactError(folder, f"the {what} cannot be loaded ({describe(exc)})", stage) from None
