"""Params files as DVC reads and writes them: YAML 1.2 through ruamel.yaml, with bounded cost, plain values only.

DVC loads ``params.yaml`` with ruamel.yaml's safe loader and ``dvc exp run -S key=value`` rewrites it with the
round-trip one, so here too ``no`` is a string, ``1e-05`` and ``1e-4`` are floats, and a duplicate key is an error.

What a hostile file can cost is bounded before anything is built from it: its size (``MAX_BYTES``), then one pass
over the parser's events (which never recurses) checks its nesting (``MAX_DEPTH``) and its number of values with
every alias expanded (``MAX_VALUES``, so an alias bomb of a few hundred bytes is refused, not expanded), and refuses
tags other than plain strings, numbers, booleans, null, lists and mappings (``!!binary``, ``!!python/...``, ...).
Every problem is a :class:`~gmpipe.errors.ParamsError` line naming the dotted key (``train_vae.lr``) or the line.
"""

from __future__ import annotations

import datetime
import io
import math
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
)
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from gmpipe.errors import ParamsError, shorten

MAX_BYTES = 1024 * 1024  # the shipped params files are ~6 KB
MAX_DEPTH = 16  # params need 3 levels (section, key, list)
MAX_VALUES = 10_000  # scalars, lists and mappings, aliases expanded; the shipped params.yaml has ~150
_LONGEST_NUMBER = 1000  # characters; longer integers are refused before Python is asked to convert them

_CORE = "tag:yaml.org,2002:"
_PLAIN_TAGS = {None, "!"} | {_CORE + name for name in ("str", "int", "float", "bool", "null", "seq", "map")}
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", type(None): "null",
               list: "a list", dict: "a mapping", bytes: "binary data", datetime.date: "a date",
               datetime.datetime: "a date and time", set: "a set", tuple: "a list"}
_FLOW_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_RESOLVER = VersionedResolver()  # YAML 1.2 implicit types, as the safe loader resolves them


def read_text(path: str | Path) -> str:
    """The text of a params file: a regular file of at most ``MAX_BYTES`` bytes of UTF-8 (as DVC requires)."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ParamsError(str(path), ["is a directory, not a params file"])
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device would never end
            raise ParamsError(str(path), ["is not a regular file"])
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ParamsError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    if len(data) > MAX_BYTES:
        raise ParamsError(str(path), [f"larger than {MAX_BYTES // 1024} KiB ({info.st_size:,} bytes); a params file "
                                      "is a few KB of YAML"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ParamsError(str(path), [f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                      f"{exc.start}); save the file as UTF-8"]) from None


def load(text: str, source: str) -> Any:
    """The plain data of a YAML 1.2 params text (dicts with string keys, lists, str, int, float, bool, None),
    read exactly as DVC reads it; None for an empty document. Raises ParamsError."""
    check_structure(text, source)
    try:
        data = YAML(typ="safe").load(text)
    except (YAMLError, ValueError, OverflowError) as exc:
        raise ParamsError(source, [_yaml_problem(exc)]) from None
    problems: list[str] = []
    _check_plain(data, (), problems)
    if problems:
        raise ParamsError(source, problems)
    return data


def load_for_update(text: str, source: str) -> CommentedMap | None:
    """A params text as an editable document that keeps its comments, quoting and layout (what ``dvc exp run -S``
    does), after the same checks as :func:`load`; None for an empty document."""
    load(text, source)
    try:
        return _round_trip().load(text)
    except (YAMLError, ValueError, OverflowError) as exc:
        raise ParamsError(source, [_yaml_problem(exc)]) from None


def dump_for_update(document: Any) -> str:
    """The text of a document from :func:`load_for_update` (or plain data): block mappings, flow lists where the
    document had them, ``null`` spelled out, long lines never re-wrapped. Strings that YAML 1.2 would read as
    something else (``'true'``, ``'1e-5'``) are quoted; ``no`` stays bare, as DVC writes it."""
    buffer = io.StringIO()
    _round_trip().dump(document, buffer)
    return buffer.getvalue()


def as_written(value: Any, source: str, key: str, depth: int = 1) -> Any:
    """A plain value (e.g. an override from JSON) as a params file holds it: lists in flow style (``[8, 16]``),
    mappings as block mappings. Refuses what a params file cannot hold, naming ``key``."""
    if depth > MAX_DEPTH:
        raise ParamsError(source, [f"{key}: nested deeper than {MAX_DEPTH} levels"])
    if isinstance(value, Mapping):
        if not all(isinstance(name, str) and name.isprintable() for name in value):
            raise ParamsError(source, [f"{key}: every key must be a string of printable characters"])
        return CommentedMap((name, as_written(item, source, f"{key}.{name}", depth + 1))
                            for name, item in value.items())
    if isinstance(value, (list, tuple)):
        sequence = CommentedSeq(as_written(item, source, f"{key}.{i}", depth + 1) for i, item in enumerate(value))
        if all(_flow_safe(item) for item in value):  # ruamel's flow emitter misquotes e.g. '?x' and nested maps
            sequence.fa.set_flow_style()
        return sequence
    if isinstance(value, str) and not value.isprintable():
        return DoubleQuotedScalarString(value)  # escaped: a bare or single-quoted NEL or U+2028 would not read back
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ParamsError(source, [f"{key}: {type_name(value)} is not a params value"])


def _flow_safe(item: Any) -> bool:
    """Whether ``item`` reads back unchanged inside a flow list (``[8, 16, reflow]``)."""
    if isinstance(item, str):
        return _FLOW_WORD.fullmatch(item) is not None
    return item is None or isinstance(item, (bool, int, float))


def check_structure(text: str, source: str) -> None:
    """One pass over the parser's events: depth, expanded size, tags, key kinds and duplicate keys.

    The parser is a state machine, so this never recurses however deep the text nests; an alias counts as the
    expanded size of what it names, so a bomb stops at ``MAX_VALUES`` after a few hundred events.
    """
    frames: list[_Frame] = []
    anchors: dict[str, int] = {}
    problems: list[str] = []
    values = documents = 0
    try:
        for event in YAML(typ="safe").parse(text):
            if isinstance(event, DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ParamsError(source, [f"line {_line(event)}: a second YAML document ('---'); a params file "
                                               "is one mapping"])
                continue
            if isinstance(event, CollectionEndEvent):
                frame = frames.pop()
                if frame.anchor:
                    anchors[frame.anchor] = values - frame.values_before
                continue
            if not isinstance(event, NodeEvent):
                continue
            parent = frames[-1] if frames else None
            if parent is not None and parent.awaiting_key:
                if not isinstance(event, ScalarEvent):
                    raise ParamsError(source, problems + [f"{_dotted(parent.path)}: line {_line(event)}: a key must "
                                                          "be a name, not a list, mapping or alias"])
                problem = parent.take_key(event)
                if problem:
                    problems.append(problem)
                if event.anchor:
                    anchors[event.anchor] = 1
                values += 1
                continue
            path = parent.child_path() if parent else ()
            if isinstance(event, AliasEvent):
                if event.anchor not in anchors:
                    raise ParamsError(source, [f"{_dotted(path)}: line {_line(event)}: alias *{event.anchor} names "
                                               "no anchor before it"])
                values += anchors[event.anchor]
            else:
                values += 1
                tag = getattr(event, "tag", None)
                if tag not in _PLAIN_TAGS:
                    problems.append(f"{_dotted(path)}: the YAML tag {_short_tag(tag)} is not allowed in params "
                                    "(only plain strings, numbers, booleans, null, lists and mappings)")
                elif isinstance(event, ScalarEvent) and len(event.value) > _LONGEST_NUMBER and _is_int(event):
                    problems.append(f"{_dotted(path)}: an integer {len(event.value):,} characters long; integers "
                                    "must fit in 64 bits")
            if values > MAX_VALUES:
                raise ParamsError(source, [f"{_dotted(path)}: more than {MAX_VALUES:,} values (aliases expanded); "
                                           "a params file has a few hundred"])
            if isinstance(event, CollectionStartEvent):
                if len(frames) >= MAX_DEPTH:
                    raise ParamsError(source, [f"{_dotted(path)}: line {_line(event)}: nested deeper than "
                                               f"{MAX_DEPTH} levels"])
                frames.append(_Frame(path, isinstance(event, MappingStartEvent), event.anchor, values - 1))
            elif isinstance(event, ScalarEvent) and event.anchor:
                anchors[event.anchor] = 1
            if parent is not None:
                parent.took_value()
    except YAMLError as exc:
        raise ParamsError(source, problems + [_yaml_problem(exc)]) from None
    if problems:
        raise ParamsError(source, problems)


class _Frame:
    """An open list or mapping during :func:`check_structure`: where it is and, for a mapping, its keys so far."""

    def __init__(self, path: tuple[str, ...], is_mapping: bool, anchor: str | None, values_before: int):
        self.path = path
        self.is_mapping = is_mapping
        self.anchor = anchor
        self.values_before = values_before
        self.awaiting_key = is_mapping
        self.keys: dict[str, int] = {}
        self.key = ""
        self.index = 0

    def take_key(self, event: ScalarEvent) -> str | None:
        """Record the key ``event``; a problem line if it repeats one of this mapping."""
        self.awaiting_key = False
        self.key = event.value
        line = _line(event)
        if event.value in self.keys:
            return (f"{_dotted(self.path + (event.value,))}: duplicate key (lines {self.keys[event.value]} and "
                    f"{line}); DVC refuses the file too: keep one")
        self.keys[event.value] = line
        return None

    def child_path(self) -> tuple[str, ...]:
        return self.path + ((self.key,) if self.is_mapping else (str(self.index),))

    def took_value(self) -> None:
        if self.is_mapping:
            self.awaiting_key = True
        else:
            self.index += 1


def _check_plain(data: Any, path: tuple[str, ...], problems: list[str]) -> None:
    """Name every key that is not a string and every value that is not plain data (dates, binary, sets)."""
    stack = [(data, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    stack.append((item, where + (key,)))
                else:
                    problems.append(f"{_dotted(where)}: the key {show(key)} is not a string; keys are names (quote "
                                    "it if it is meant as one)")
        elif isinstance(value, list):
            stack.extend((item, where + (str(i),)) for i, item in enumerate(value))
        elif isinstance(value, (datetime.date, datetime.datetime)):
            problems.append(f"{_dotted(where)}: {show(value)} is read as {type_name(value)} in YAML; quote it if it "
                            "is text")
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            problems.append(f"{_dotted(where)}: {type_name(value)} is not a params value")


def show(value: Any, limit: int = 60) -> str:
    """``value`` as YAML spells it (``false``, ``null``, ``.inf``, ``'no'``, ``[1, 2]``), at most ``limit``
    characters however large the value is."""
    parts: list[str] = []
    budget = [limit + 1]

    def emit(text: str) -> bool:
        parts.append(text[: budget[0]])
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(item: Any) -> bool:
        if isinstance(item, dict):
            if not emit("{"):
                return False
            for i, (key, inner) in enumerate(item.items()):
                if not (emit(", " if i else "") and walk(key) and emit(": ") and walk(inner)):
                    return False
            return emit("}")
        if isinstance(item, (list, tuple, set)):
            if not emit("["):
                return False
            for i, inner in enumerate(item):
                if not (emit(", " if i else "") and walk(inner)):
                    return False
            return emit("]")
        return emit(_scalar(item, budget[0]))

    walk(value)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar(value: Any, limit: int) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, int) and abs(value) > 10**limit:  # str() of a huge int is slow and long
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)):
        return repr(value[: limit + 1])
    return str(value)[: limit + 1]


def type_name(value: Any) -> str:
    """``a boolean``, ``an integer``, ``a string``, ... as the YAML reader would call ``value``'s kind."""
    for kind, name in _TYPE_NAMES.items():
        if type(value) is kind:
            return name
    return f"a {type(value).__name__}"


def _round_trip() -> YAML:
    document = YAML()  # round-trip, as ``dvc exp run -S`` rewrites params
    document.preserve_quotes = True
    document.width = 4096  # never re-wrap long lines
    document.indent(mapping=2, sequence=2, offset=0)
    document.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar(_CORE + "null", "null")
    )
    return document


def _yaml_problem(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"{where}not valid YAML ({shorten(str(problem), 120)})"


def _is_int(event: ScalarEvent) -> bool:
    """Whether YAML 1.2 reads ``event`` as an integer (Python refuses to convert one of more than 4,300 digits)."""
    if event.tag == _CORE + "int":
        return True
    plain = event.tag is None and event.implicit[0]
    return plain and _RESOLVER.resolve(ScalarNode, event.value, (True, False)) == _CORE + "int"


def _line(event: Any) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(shorten(part, 40) for part in path) or "(top level)"


def _short_tag(tag: str) -> str:
    return shorten("!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag, 60)

