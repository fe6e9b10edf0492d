"""Captions: the one check every caption passes (a ``captions.jsonl`` line or a ``gmpipe sample --prompts``
argument), and the reader of an image folder's ``captions.jsonl``.

``captions.jsonl`` holds one JSON object per line, ``{"file": "class/name.png", "caption": "..."}``. A line that
cannot be used is reported (file ``captions.jsonl:N``) and skipped, never fatal; reading is bounded: lines longer
than ``MAX_LINE_BYTES`` and files larger than ``MAX_FILE_BYTES`` are refused without being held in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gmpipe.data.prepared import Rejected

CAPTIONS_FILE = "captions.jsonl"
# Text encoders read at most a few hundred tokens (about 4 characters each); longer captions only cost storage.
MAX_CAPTION_CHARS = 1000
MAX_LINE_BYTES = 2**20
MAX_FILE_BYTES = 256 * 2**20


# The caption an image of a class stands for when it has none (and the prompt evaluation asks a text model for).
CLASS_CAPTION = "a photo of a {}"


def caption_for_class(class_name: str) -> str:
    """``a photo of a <class name in lower case>``."""
    return CLASS_CAPTION.format(class_name.lower())


class CaptionError(ValueError):
    """A caption that cannot be used; the message says why."""


def check_caption(text: object) -> str:
    """``text`` if it is a usable caption: a non-empty string that encodes as UTF-8, at most MAX_CAPTION_CHARS."""
    if not isinstance(text, str):
        raise CaptionError(f"not a string ({type(text).__name__})")
    if not text.strip():
        raise CaptionError("empty caption")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CaptionError("not valid Unicode text (lone surrogate)") from None
    if len(text) > MAX_CAPTION_CHARS:
        raise CaptionError(f"{len(text)} characters; at most {MAX_CAPTION_CHARS}")
    return text


@dataclass(frozen=True)
class Caption:
    line: int  # line number in captions.jsonl, for reports
    text: str


def _numbered_lines(handle, limit: int):
    """(number, line bytes) for each line; a line longer than ``limit`` comes as (number, None), unread."""
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := handle.readline(2**20)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        else:
            yield number, line


def _parse_line(line: bytes, number: int) -> tuple[str, str, str | None]:
    """(file, caption, note) from one line; raises CaptionError saying what is wrong with it."""
    try:
        text = line.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError:
        raise CaptionError("not UTF-8 text") from None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CaptionError('not a JSON line {"file": ..., "caption": ...}') from None
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or "caption" not in record:
        raise CaptionError('not a {"file": str, "caption": str} object')
    caption, note = record["caption"], None
    if isinstance(caption, str) and len(caption) > MAX_CAPTION_CHARS:
        note = f"caption of {len(caption)} characters truncated to {MAX_CAPTION_CHARS}"
        caption = caption[:MAX_CAPTION_CHARS]
    return PurePosixPath(record["file"]).as_posix(), check_caption(caption), note


def read_captions(path: Path) -> tuple[dict[str, Caption], list[Rejected]]:
    """Captions by image path relative to the folder (``class/name.png``), and the lines that were not used
    as written (file ``captions.jsonl:N``, with the reason). A file may be captioned once: a later line wins."""
    captions: dict[str, Caption] = {}
    problems: list[Rejected] = []
    if not path.is_file():
        return captions, problems
    if path.stat().st_size > MAX_FILE_BYTES:
        return captions, [Rejected(CAPTIONS_FILE, f"larger than {MAX_FILE_BYTES} bytes: not read, default captions")]
    with open(path, "rb") as handle:
        for number, line in _numbered_lines(handle, MAX_LINE_BYTES):
            where = f"{CAPTIONS_FILE}:{number}"
            if line is None:
                problems.append(Rejected(where, f"line longer than {MAX_LINE_BYTES} bytes: skipped"))
                continue
            if not line.strip():
                continue
            try:
                file, caption, note = _parse_line(line, number)
            except CaptionError as exc:
                problems.append(Rejected(where, f"{exc}: skipped"))
                continue
            if note:
                problems.append(Rejected(where, note))
            if file in captions:
                problems.append(Rejected(f"{CAPTIONS_FILE}:{captions[file].line}",
                                         f"{file} is captioned again on line {number}, which wins"))
            captions[file] = Caption(number, caption)
    return captions, problems


def unused_captions(captions: dict[str, Caption], used: set[str], rejected: set[str]) -> list[Rejected]:
    """A line for every caption whose file is not among the images used."""
    return [
        Rejected(f"{CAPTIONS_FILE}:{caption.line}",
                 f"{file} was rejected (see its line): caption unused" if file in rejected
                 else f"{file} is not an image of the folder: caption unused")
        for file, caption in sorted(captions.items(), key=lambda item: item[1].line)
        if file not in used
    ]
