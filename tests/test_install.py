"""The install that fits the user: without the `pipeline` extra (Prefect, DVC, dvclive, fastapi) gmpipe imports,
`gmpipe sample`, `gmpipe check-params` and `--version` run, and the evaluation modules import; `gmpipe stage` and
`gmpipe pipeline` say in one line which extra to install. Checked in a fresh process whose import system cannot
see those packages (their modules and their installed-distribution records hidden, as if never installed)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.hostile import write_model_folders

REPO = Path(__file__).resolve().parents[1]
PIPELINE_EXTRA = ("prefect", "dvc", "dvclive", "fastapi")
TRAINING_LOOP = "gmpipe/train/loop.py"

WITHOUT_PIPELINE_EXTRA = r"""
import contextlib, importlib, io, json, pkgutil, sys
from importlib.machinery import PathFinder

HIDDEN = set(sys.argv[1].split(","))


def hidden(name):
    top = name.partition(".")[0].replace("-", "_").lower()
    return top in HIDDEN or any(top.startswith(package + "_") for package in HIDDEN)  # dvc_data, dvc_objects ...


class WithoutPipelineExtra(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if hidden(name) else super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, context=None, **kwargs):
        found = super().find_distributions(context, **kwargs) if context else super().find_distributions(**kwargs)
        return (d for d in found if not hidden(d.metadata["Name"] or ""))


sys.meta_path[sys.meta_path.index(PathFinder)] = WithoutPipelineExtra
report = {}
for name in sorted(HIDDEN):
    try:
        importlib.import_module(name)
        report.setdefault("importable", []).append(name)
    except ModuleNotFoundError:
        pass

from gmpipe.cli import main

for label, argv in json.loads(sys.argv[2]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's --version
            code = exit.code
    report[label] = [code, err.getvalue(), out.getvalue()]

import gmpipe.eval

failed = {}
evaluation = [module.name for module in pkgutil.walk_packages(gmpipe.eval.__path__, "gmpipe.eval.")]
for name in [*evaluation, "gmpipe.stages.evaluate", "gmpipe.pipelines.latent_diffusion"]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
report["modules_failed"] = failed
report["pipeline_modules_loaded"] = sorted(name for name in sys.modules if hidden(name))
print(json.dumps(report))
"""


def test_the_library_imports_no_orchestration_package():
    """Anywhere in gmpipe/, at module level or inside a function: no Prefect, DVC or fastapi; dvclive only in the
    training loop (training runs as a stage, which needs the pipeline extra anyway)."""
    found = []
    for path in sorted((REPO / "gmpipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.partition(".")[0]
                if top in PIPELINE_EXTRA and (top, path.relative_to(REPO).as_posix()) != ("dvclive", TRAINING_LOOP):
                    found.append(f"{path.relative_to(REPO)}: {name}")
    assert found == []


def test_sampling_evaluation_and_checks_need_no_pipeline_extra(tmp_path):
    ldm, vae = write_model_folders(tmp_path)
    out = tmp_path / "samples.npz"
    commands = {
        "version": ["--version"],
        "check-params": ["check-params", str(REPO / "configs" / "smoke.yaml")],
        "sample": ["sample", "--model", str(ldm), "--vae", str(vae), "--classes", "1", "-n", "2", "--steps", "2",
                   "--sampler", "dpmpp_2m", "--device", "cpu", "--out", str(out)],
        "stage": ["stage", "prepare", "--root", str(tmp_path)],
        "pipeline": ["pipeline", "--root", str(tmp_path)],
    }
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", WITHOUT_PIPELINE_EXTRA, ",".join(PIPELINE_EXTRA),
                             json.dumps(commands)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "importable" not in report  # the packages really are hidden
    assert report["version"][:2] == [0, ""] and report["version"][2].startswith("gmpipe ")
    assert report["check-params"][:2] == [0, ""]
    assert report["sample"][:2] == [0, ""] and out.is_file()
    for command in ("stage", "pipeline"):
        code, stderr, _ = report[command]
        assert code == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr
        assert f"'gmpipe {command}' runs stages through Prefect and DVC" in stderr
        assert "pip install 'gmpipe[pipeline]'" in stderr
    assert report["modules_failed"] == {} and report["pipeline_modules_loaded"] == []
