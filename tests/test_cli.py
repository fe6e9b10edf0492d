"""The CLI door: every bad argument is one line naming it and a non-zero exit, before any model is loaded; good
arguments are used as given; `gmpipe --version` and `python -m gmpipe` exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmpipe import __version__
from gmpipe.cli import main
from tests.hostile import assert_one_clear_line, run_limited, write_model_folders

# (id, arguments after `gmpipe`, what the one error line says); every row exits 2 at parse time
BAD_ARGUMENTS = [
    ("n-zero", ["sample", "-n", "0"], "argument -n: must be between 1 and 1000 (got 0)"),
    ("n-negative", ["sample", "-n", "-3"], "argument -n: must be between 1 and 1000 (got -3)"),
    ("n-huge", ["sample", "-n", "10000000000"], "argument -n: must be between 1 and 1000"),
    ("n-not-a-number", ["sample", "-n", "eight"], "argument -n: expected an integer, got 'eight'"),
    ("steps-zero", ["sample", "--steps", "0"], "argument --steps: must be between 1 and 1000 (got 0)"),
    ("steps-huge", ["sample", "--steps", "99999999"], "argument --steps: must be between 1 and 1000"),
    ("guidance-nan", ["sample", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    ("guidance-inf", ["sample", "--guidance", "inf"], "argument --guidance: must be a finite number"),
    ("guidance-negative", ["sample", "--guidance", "-1"], "argument --guidance: must be a finite number between 0"),
    ("guidance-huge", ["sample", "--guidance", "1e300"], "argument --guidance: must be a finite number"),
    ("seed-negative", ["sample", "--seed", "-1"], "argument --seed: must be between 0 and"),
    ("seed-2-64", ["sample", "--seed", str(2**64)], "argument --seed: must be between 0 and"),
    ("class-negative", ["sample", "--classes", "-1"], "argument --classes: must be between 0"),
    ("sampler-unknown", ["sample", "--sampler", "warp"], "argument --sampler: invalid choice: 'warp'"),
    ("prompt-empty", ["sample", "--prompts", ""], "argument --prompts: unusable prompt (empty caption)"),
    ("prompt-too-long", ["sample", "--prompts", "x" * 5000], "unusable prompt (5000 characters; at most 1000)"),
    ("unknown-command", ["train"], "argument COMMAND: invalid choice: 'train'"),
    ("unknown-stage", ["stage", "teleport"], "argument name: invalid choice: 'teleport'"),
    ("unknown-option", ["sample", "--turbo"], "unrecognized arguments: --turbo"),
    ("no-command", [], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("argv", "message"), [row[1:] for row in BAD_ARGUMENTS], ids=[row[0] for row in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--help" in err, err


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_model_folders(root)
    for name in ("progressive-1step", "reflow"):
        (root / "models" / "student" / name).mkdir(parents=True)
    return root


# (id, arguments after `gmpipe sample`, what the one error line names); each exits 1 before sampling
BAD_SAMPLE_RUNS = [
    ("model-missing", ["--model", "no/such/model"], "--model no/such/model: no such folder"),
    ("student-missing", ["--model", "models/student/progressive"],
     "--model models/student/progressive: no such folder (models/student has progressive-1step, reflow; the "
     "'distill' stage writes it)"),
    ("model-is-a-file", ["--model", "file.txt"], "--model file.txt: no such folder"),
    ("model-without-files", ["--model", "models/vae"], "no trained model here"),
    ("vae-missing", ["--vae", "nowhere"], "nowhere: no trained autoencoder here; run the 'train_vae' stage first"),
    ("out-unknown-suffix", ["--out", "samples.gif"], "--out samples.gif: give a .png"),
    ("out-is-a-folder", ["--out", "models.png"], "--out models.png: is a folder"),
    ("out-under-a-file", ["--out", "file.txt/x.png"], "--out file.txt/x.png: cannot write in file.txt"),
    ("out-unwritable", ["--out", "/proc/gmpipe/x.png"], "--out /proc/gmpipe/x.png: cannot write in /proc/gmpipe"),
    ("class-out-of-range", ["--classes", "0", "7"], "--classes 7: this model has classes 0..1"),
    ("too-many-images", ["--classes", "0", "1", "0", "1", "0", "1", "0", "1", "0", "1", "0", "1", "-n", "1000"],
     "more than 10000"),
]


@pytest.mark.parametrize(("argv", "message"), [row[1:] for row in BAD_SAMPLE_RUNS],
                         ids=[row[0] for row in BAD_SAMPLE_RUNS])
def test_bad_sample_run_is_one_line_and_keeps_old_output(model_root, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(model_root)
    (model_root / "file.txt").write_text("a file")
    (model_root / "models.png").mkdir(exist_ok=True)
    out = tmp_path / "old.png"
    out.write_bytes(b"previous")
    argv = argv if "--out" in argv else [*argv, "--out", str(out)]
    assert main(["sample", *argv]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gmpipe: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and out.read_bytes() == b"previous"


def test_sample_uses_the_steps_and_guidance_given(model_root, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(model_root / "models/ldm"), "--vae", str(model_root / "models/vae"), "-n", "2"]
    assert main([*args, "--steps", "2", "--guidance", "0", "--out", str(out)]) == 0
    assert "steps=2, guidance=0.0, shift=1.0, 2 network evaluations per image" in capsys.readouterr().out
    assert out.stat().st_size
    npz = tmp_path / "arrays.npz"
    assert main([*args, "--steps", "1", "--guidance", "1.5", "--classes", "1", "--out", str(npz)]) == 0
    assert "steps=1, guidance=1.5, shift=1.0, 2 network evaluations per image" in capsys.readouterr().out
    import numpy as np

    with np.load(npz) as arrays:
        assert arrays["images"].shape == (2, 1, 8, 8) and arrays["labels"].tolist() == [1, 1]


def test_version_and_python_m():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for command in (["gmpipe", "--version"], [sys.executable, "-m", "gmpipe", "--version"]):
        if command[0] == "gmpipe":
            command[0] = str(Path(sys.executable).parent / "gmpipe")
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == f"gmpipe {__version__}"
    result = subprocess.run([sys.executable, "-m", "gmpipe", "sample", "-n", "0"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_broken_dvc_yaml_is_one_line(tmp_path):
    import yaml

    from tests.conftest import smoke_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params()))
    (tmp_path / "dvc.yaml").write_text("stages: [unclosed")
    result = run_limited([str(Path(sys.executable).parent / "gmpipe"), "pipeline", "--root", str(tmp_path)],
                         tmp_path, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dvc.yaml: not a dvc.yaml with a 'stages' mapping" in result.stderr


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    import gmpipe.cli as cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_check_params", broken)  # build_parser binds the command when main() runs
    assert cli.main(["check-params"]) == 1
    assert capsys.readouterr().err.strip() == ("gmpipe: error: unexpected ZeroDivisionError: a bug "
                                               "(rerun with GMPIPE_DEBUG=1 for the traceback)")
    monkeypatch.setenv("GMPIPE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["check-params"])


def test_sample_missing_model_through_the_real_command(tmp_path):
    result = run_limited([str(Path(sys.executable).parent / "gmpipe"), "sample", "--out", "x.png"], tmp_path,
                         timeout=60)
    assert_one_clear_line(result, "--model models/ldm: no such folder")
