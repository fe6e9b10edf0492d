"""The params door under bad and hostile input: every file answers exit 2 with one ``file: key: rule`` line per
problem, no traceback, in bounded time and memory, and nothing existing is touched.

One row per bad input (in-process, fast), hypothesis properties over generated texts and override values, and the
nasty cases (alias bomb, 100 MB file, deep nesting, a 50,000-digit integer) as real ``gmpipe`` processes under a
1.5 GB address-space limit.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmpipe.cli import main
from gmpipe.config import yaml_io
from gmpipe.config.params import ParamsError, load_params
from gmpipe.errors import ParamsError as SharedParamsError
from tests.conftest import BIN, REPO

SMOKE = (REPO / "configs" / "smoke.yaml").read_text()
MEMORY_LIMIT = 1536 * 1024 * 1024

ALIAS_BOMB = "".join(
    [f"lol0: &lol0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)  # 9**10 = 3.5e9 strings once expanded, from 742 bytes


def smoke_with(old: str, new: str) -> str:
    """configs/smoke.yaml with one line edited (the edit must apply)."""
    assert old in SMOKE, old
    return SMOKE.replace(old, new, 1)


def _set(section: str, line: str) -> str:
    """configs/smoke.yaml with ``line`` (``key: value``) in ``section``: replacing that key's line if the section
    has one, else first in the section."""
    key = line.split(":", 1)[0]
    lines = SMOKE.splitlines(keepends=True)
    start = lines.index(f"{section}:\n") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith(" ")), len(lines))
    for i in range(start, end):
        if lines[i].startswith(f"  {key}:"):
            return "".join(lines[:i] + [f"  {line}\n"] + lines[i + 1:])
    return "".join(lines[:start] + [f"  {line}\n"] + lines[start:])


# (row id, the file's content (text or bytes), a piece of the expected line after "FILE: ")
BAD_FILES = [
    ("non-utf8", SMOKE.encode().replace(b"device: cpu", b"device: c\xffpu"), "line 5: not UTF-8 text (byte 0xff"),
    ("latin1-file", "data:\n  path: /données\n".encode("latin-1"), "line 2: not UTF-8 text (byte 0xe9"),
    ("alias-bomb", ALIAS_BOMB, "lol4.0: more than 10,000 values (aliases expanded)"),
    ("deep-nesting", "data: " + "[" * 5000 + "]" * 5000 + "\n", "data.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0: line 1: nested "
     "deeper than 16 levels"),
    ("deep-mappings", "data:" + "".join(f"\n{'  ' * i}k{i}:" for i in range(1, 40)) + " 1\n",
     "nested deeper than 16 levels"),
    ("weight-decay-inf", _set("train_vae", "weight_decay: .inf"),
     "train_vae.weight_decay: must be a finite number (got .inf)"),
    ("logit-mean-nan", _set("train_ldm", "logit_mean: .nan"),
     "train_ldm.logit_mean: must be a finite number (got .nan)"),
    ("time-shift-inf", _set("distill", "time_shift: .inf"), "distill.time_shift: must be a finite number (got .inf)"),
    ("kl-weight-minus-inf", _set("train_vae", "kl_weight: -.Inf"),
     "train_vae.kl_weight: must be a finite number (got -.inf)"),
    ("guidance-sweep-nan", _set("evaluate", "guidance_sweep: [0.0, .NaN]"),
     "evaluate.guidance_sweep.1: must be a finite number (got .nan)"),
    ("seed-2**64", smoke_with("  seed: 0", "  seed: 18446744073709551616"),
     "prepare.seed: must be <= 4294967295 (got 18446744073709551616)"),
    ("seed-2**32", _set("train_vae", "seed: 4294967296"), "train_vae.seed: must be <= 4294967295"),
    ("seed-negative", _set("evaluate", "seed: -1"), "evaluate.seed: must be >= 0 (got -1)"),
    ("steps-2**63", _set("train_ldm", "steps: 9223372036854775808"),
     "train_ldm.steps: must fit in 64 bits, -2**63 to 2**63 - 1 (got an integer of 64 bits)"),
    ("threads-2**70", _set("compute", "threads: 0x400000000000000000"), "compute.threads: must be <= 1024"),
    ("int-5000-digits", _set("train_vae", "steps: " + "9" * 5000),
     "train_vae.steps: an integer 5,000 characters long; integers must fit in 64 bits"),
    ("float-overflow", _set("train_vae", "lr: 1e999"), "train_vae.lr: must be a finite number (got .inf)"),
    ("mixed-precision-false", _set("compute", "mixed_precision: false"),
     "compute.mixed_precision: must be one of 'auto', 'no', 'bf16' or 'fp16' (got false, a boolean)"),
    ("mixed-precision-yes", _set("compute", "mixed_precision: yes"),
     "compute.mixed_precision: must be one of 'auto', 'no', 'bf16' or 'fp16' (got 'yes')"),
    ("steps-as-string", _set("train_vae", "steps: '30'"), "train_vae.steps: must be an integer (got '30', a string)"),
    ("lr-as-string", _set("train_vae", 'lr: "1e-3"'), "train_vae.lr: must be a number (got '1e-3', a string)"),
    ("steps-as-float", _set("train_vae", "steps: 1.5e1"), "train_vae.steps: must be an integer (got 15.0, a float)"),
    ("binary-tag", _set("compute", "device: !!binary Y3B1"), "compute.device: the YAML tag !!binary is not allowed"),
    ("python-tag", _set("compute", "device: !!python/object/apply:os.system [echo hi]"),
     "compute.device: the YAML tag !!python/object/apply:os.system is not allowed"),
    ("local-tag", _set("compute", "device: !cpu cpu"), "compute.device: the YAML tag !cpu is not allowed"),
    ("set-tag", _set("distill", "methods: !!set {reflow}"), "distill.methods: the YAML tag !!set is not allowed"),
    ("integer-key", _set("compute", "1: 2"), "compute: the key 1 is not a string; keys are names (quote it"),
    ("null-key", _set("compute", "~: 2"), "compute: the key null is not a string; keys are names"),
    ("list-key", _set("compute", "? [a, b]\n  : 2"), "compute: line 4: a key must be a name, not a list"),
    ("date-value", smoke_with("  path: /usr/share/datasets/fashion-mnist", "  path: 2024-01-31"),
     "data.path: 2024-01-31 is read as a date in YAML; quote it if it is text"),
    ("duplicate-key", smoke_with("  device: cpu\n", "  device: cpu\n  device: cuda\n"),
     "compute.device: duplicate key (lines 5 and 6)"),
    ("duplicate-section", SMOKE + "prepare:\n  seed: 1\n",
     f"prepare: duplicate key (lines {SMOKE.splitlines().index('prepare:') + 1} and "),
    ("undefined-alias", _set("compute", "device: *nowhere"), "compute.device: line 5: alias *nowhere names no anchor"),
    ("empty-file", "", "(top level): the file is empty"),
    ("comment-only", "# params: to do\n", "(top level): the file is empty"),
    ("missing-section", SMOKE.replace("\ndistill:\n", "\nunused:\n"), "distill: section is missing"),
    ("top-level-list", "- data\n- prepare\n", "(top level): must be a mapping of sections (got a list)"),
    ("top-level-scalar", "params\n", "(top level): must be a mapping of sections (got a string)"),
    ("two-documents", SMOKE + "---\ndata: {}\n", "a second YAML document ('---')"),
    ("tab-indent", SMOKE.replace("\n  device: cpu", "\n\tdevice: cpu"), "line 5: not valid YAML"),
    ("nul-byte", SMOKE.replace("device: cpu", "device: c\0pu"), "not valid YAML"),
    ("unclosed-flow", SMOKE + "extra: [1, 2\n", "not valid YAML"),
    ("long-unknown-key", _set("compute", "x" * 1000 + ": 1"), "compute.xxxxxxxxx"),
    ("key-over-1024-chars", _set("compute", "x" * 100_000 + ": 1"), "line 4: not valid YAML (mapping values"),
    ("huge-string-value", _set("compute", "device: " + "c" * 200_000), "(got 'cccccccc"),
    ("unknown-section", SMOKE.replace("\ndistill:\n", "\ndistill: {}\nunused:\n"), "unused: unknown key"),
]


@pytest.mark.parametrize(("content", "expected"), [row[1:] for row in BAD_FILES], ids=[row[0] for row in BAD_FILES])
def test_bad_params_file_one_line_per_problem_exit_2(tmp_path, capsys, content, expected):
    file = tmp_path / "params.yaml"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["check-params", str(file)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and "Traceback" not in captured.err
    assert lines and all(line.startswith(f"{file}: ") for line in lines), lines
    assert len(captured.err) < 2_000, len(captured.err)  # every echoed value and key is cut short
    assert any(expected in line for line in lines), lines


def test_at_least_forty_distinct_bad_files():
    assert len({row[0] for row in BAD_FILES}) == len(BAD_FILES) >= 40


@pytest.mark.parametrize(("kind", "expected"), [
    ("directory", "is a directory, not a params file"),
    ("fifo", "is not a regular file"),  # reading would block
    ("device", "is not a regular file"),  # /dev/zero: reading would never end
    ("unreadable", "cannot read file: Input/output error"),  # /proc/self/mem: open() works, read() fails
    ("symlink-loop", "cannot read file: Too many levels of symbolic links"),
    ("missing", "cannot read file: No such file or directory"),
])
def test_paths_that_are_no_readable_params_file(tmp_path, capsys, kind, expected):
    path = {"device": Path("/dev/zero"), "unreadable": Path("/proc/self/mem")}.get(kind, tmp_path / "params.yaml")
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-loop":
        path.symlink_to(path)
    assert main(["check-params", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: {expected}\n"


def test_too_many_problems_are_counted_not_listed(tmp_path, capsys):
    file = tmp_path / "params.yaml"
    file.write_text(_set("compute", "\n  ".join(f"unknown_{i}: 1" for i in range(2000))))
    assert main(["check-params", str(file)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == SharedParamsError.MAX_LINES + 1
    assert lines[-1] == f"{file}: ... and {2000 - SharedParamsError.MAX_LINES} more problems"


def test_params_error_is_a_gmpipe_error_with_exit_code_2():
    assert ParamsError is SharedParamsError and SharedParamsError.exit_code == 2


# -- YAML 1.2, as DVC reads and writes params ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("no", "no"), ("yes", "yes"), ("off", "off"), ("On", "On"), ("1e-05", 1e-05), ("1e-4", 1e-4), ("1.0e-6", 1e-6),
    ("0o17", 15), ("017", 17), ("0x1F", 31), ("1_000", 1000), ("true", True), ("~", None), ("null", None),
    ("'no'", "no"), ('"1e-4"', "1e-4"), ("1:20", "1:20"),
])
def test_scalars_read_as_yaml_1_2(text, value):
    assert yaml_io.load(f"key: {text}\n", "t") == {"key": value}


def test_shipped_files_read_the_same_by_pyyaml_and_yaml_1_2():
    """The shipped files use no scalar that YAML 1.1 and 1.2 read differently, so older tools agree; the test
    fixtures (tests/conftest.py) write them with PyYAML, whose output reads back identically."""
    for file in (REPO / "params.yaml", REPO / "configs" / "smoke.yaml"):
        text = file.read_text()
        assert yaml_io.load(text, str(file)) == yaml.safe_load(text)
        data = yaml_io.load(text, str(file))
        assert yaml_io.load(yaml.safe_dump(data, sort_keys=False), "dumped") == data


def test_aliases_within_bounds_read_as_dvc_reads_them(tmp_path):
    file = tmp_path / "params.yaml"
    file.write_text(smoke_with("  lr: 0.001\n  warmup_steps: 5\n  disc_start", "  lr: &lr 0.002\n  warmup_steps: 5\n"
                               "  disc_start").replace("  lr: 0.0005", "  lr: *lr"))
    params = load_params(file)
    assert params.train_vae.loop.lr == params.distill.loop.lr == 0.002


# -- properties ------------------------------------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from([
    "a", "data", "compute", ":", ": ", "- ", "\n", "  ", "[", "]", "{", "}", ",", "&x ", "*x", "&y ", "*y", "!!binary ",
    "!!python/object:os.system ", "!foo ", "? ", "---\n", "...\n", "no", "1e-05", ".inf", ".nan", "-1", "9" * 30,
    "'", '"', "#", "\t", "\ufeff", "\x85", "\u2028", "<<: ", "%YAML 1.1\n", "2024-01-01", "~", "|\n", ">\n",
])
_TEXTS = st.one_of(
    st.lists(_FRAGMENTS, max_size=60).map("".join),
    st.text(max_size=300),
    st.builds(lambda prefix, junk: prefix + junk, st.just(SMOKE), st.lists(_FRAGMENTS, max_size=20).map("".join)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXTS, tail=st.binary(max_size=8))
def test_any_text_or_bytes_is_ok_or_exit_2_with_file_lines(tmp_path, capsys, text, tail):
    file = tmp_path / "params.yaml"
    file.write_bytes(text.encode("utf-8", "surrogatepass") + tail)
    code = main(["check-params", str(file)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 0:
        assert captured.out == f"{file}: ok\n"
    else:
        lines = captured.err.splitlines()
        assert code == 2 and lines and all(line.startswith(f"{file}: ") for line in lines), captured.err
        assert len(lines) <= SharedParamsError.MAX_LINES + 1


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(min_size=1, max_size=6).filter(str.isprintable), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=_PLAIN)
def test_writer_and_reader_agree_on_every_plain_value(value):
    """What the override writer writes, the reader reads back unchanged: strings like `no`, `1e-5`, `true`, `~`,
    `<<`, `?x`, control characters and line separators included (keys are printable names)."""
    document = yaml_io.load_for_update("compute:  # where training runs\n  device: cpu\n", "params")
    document["compute"]["value"] = yaml_io.as_written(value, "override", "compute.value")
    assert yaml_io.load(yaml_io.dump_for_update(document), "written")["compute"]["value"] == value


# -- the nasty ones, as real processes under a memory limit -----------------------------------------------------------

def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _gmpipe(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO))
    started = time.monotonic()
    result = subprocess.run([str(BIN / "gmpipe"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120, preexec_fn=_limit_memory)
    return result, time.monotonic() - started


def _write_hundred_megabytes(file: Path) -> None:
    block = (SMOKE + "\n# " + "x" * 1000 + "\n").encode()
    with file.open("wb") as handle:
        for _ in range(100 * 1024 * 1024 // len(block) + 1):
            handle.write(block)


NASTY = {
    "alias-bomb": (lambda file: file.write_text(ALIAS_BOMB), "lol4.0: more than 10,000 values"),
    "alias-bomb-in-data-path": (
        lambda file: file.write_text(ALIAS_BOMB.replace("lol", "x") + smoke_with("  path: /usr/share/datasets/"
                                                                                 "fashion-mnist", "  path: *x9")),
        "x4.0: more than 10,000 values"),
    "100-MB-file": (_write_hundred_megabytes, "larger than 1024 KiB"),
    "deep-nesting": (lambda file: file.write_text("data: " + "[" * 500_000 + "]" * 500_000 + "\n"),
                     "data.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0: line 1: nested deeper than 16 levels"),
    "deep-mappings": (lambda file: file.write_text("data: " + "{a: " * 200_000 + "}" * 200_000 + "\n"),
                                 "nested deeper than 16 levels"),
    "huge-integer": (lambda file: file.write_text(_set("train_vae", "steps: " + "9" * 900_000)),
                     "train_vae.steps: an integer 900,000 characters long"),
}


@pytest.mark.parametrize("case", list(NASTY))
def test_nasty_files_in_real_processes_under_a_memory_limit(tmp_path, case):
    """`gmpipe check-params`, `gmpipe stage` and `gmpipe pipeline` on each: exit 2 within seconds under a 1.5 GB
    address-space limit, one line naming the file and what is wrong, and the existing output untouched."""
    write, expected = NASTY[case]
    params = tmp_path / "params.yaml"
    write(params)
    manifest = tmp_path / "data" / "prepared" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"from": "an earlier run"}\n')
    before = manifest.stat()
    for args in (["check-params", str(params)], ["stage", "prepare", "--root", str(tmp_path)],
                 ["pipeline", "--root", str(tmp_path), "--no-server"]):
        result, seconds = _gmpipe(args, tmp_path)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{params}: ") and expected in lines[0], lines
        assert seconds < 30, (args, seconds)
    assert manifest.read_text() == '{"from": "an earlier run"}\n'
    assert (manifest.stat().st_mtime_ns, manifest.stat().st_ino) == (before.st_mtime_ns, before.st_ino)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]  # nothing else was written


def test_the_memory_limit_is_real(tmp_path):
    """The limit the nasty cases run under does stop a process that grows past it."""
    result = subprocess.run([sys.executable, "-c", "x = bytearray(2 * 1024**3)"], capture_output=True, text=True,
                            timeout=60, preexec_fn=_limit_memory)
    assert result.returncode != 0 and "MemoryError" in result.stderr
