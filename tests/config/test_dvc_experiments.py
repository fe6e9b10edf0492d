"""DVC experiments on the shipped params files, for real: ``dvc exp run -S``, the queue, ``dvc exp show``.

DVC rewrites ``params.yaml`` as YAML 1.2 (``mixed_precision: no`` bare, ``1e-05``); each test checks that the file
DVC wrote is what gmpipe read: the prepared split holds exactly ``max_per_class`` images per class. And the files
DVC refuses to run a stage with, ``gmpipe check-params`` refuses too.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gmpipe.cli import main
from gmpipe.config import yaml_io
from gmpipe.config.params import Params, load_params
from tests.conftest import BIN, FIXTURE_FASHION_MNIST, REPO, run


def shipped_params_text(name: str) -> str:
    """A shipped params file with comments and layout kept, its ``data.path`` pointed at the committed fixture."""
    file = REPO / name
    document = yaml_io.load_for_update(file.read_text(), str(file))
    document["data"]["path"] = str(FIXTURE_FASHION_MNIST)
    return yaml_io.dump_for_update(document)


def _commit(root: Path) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "scratch project"], root)


def _per_class(manifest: Path) -> set[int]:
    counts = json.loads(manifest.read_text())["counts"]
    return {count for split in ("train", "val", "test") for count in counts[split]["per_class"].values()}


def _experiments(root: Path) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name: its params.yaml params}."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    found = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]
    return found


def _wait_for_queue(root: Path, name: str, timeout: float = 300) -> str:
    """Wait until the queue has run experiment ``name``; returns ``dvc queue status``. Polls git for the
    experiment's ref (milliseconds) and asks DVC (a second of CPU per call) only every few seconds."""
    deadline = time.monotonic() + timeout
    for tick in itertools.count():
        refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root).stdout.split()
        if any(ref.endswith(f"/{name}") for ref in refs) or tick % 10 == 9:
            status = run(["dvc", "queue", "status"], root).stdout
            if "Queued" not in status and "Running" not in status:
                return status
        assert time.monotonic() < deadline, run(["dvc", "queue", "status"], root).stdout
        time.sleep(0.5)
    raise AssertionError("unreachable")


def test_dvc_exp_run_set_writes_yaml_1_2_that_gmpipe_reads(prefect_api, dvc_project):
    """The demo params.yaml: DVC writes `no` bare and `1e-05`; gmpipe reads them as a string and a float."""
    root = dvc_project(shipped_params_text("params.yaml"))
    _commit(root)
    started = time.monotonic()
    run(["dvc", "exp", "run", "prepare", "--name", "four-per-class", "-S", "prepare.max_per_class=4",
         "-S", "compute.mixed_precision=no", "-S", "train_vae.kl_weight=1e-05", "-S", "train_ldm.lr=1e-4"], root)
    seconds = time.monotonic() - started
    text = (root / "params.yaml").read_text()
    # As DVC writes YAML 1.2: `no` bare (a boolean in YAML 1.1), 1e-05 without a dot (a string in YAML 1.1).
    # Each value is followed by its comment or the line's end, whichever the shipped file has.
    for line in ("  mixed_precision: no", "  kl_weight: 1e-05", "  lr: 0.0001"):
        assert re.search(rf"^{re.escape(line)}( |$)", text, re.MULTILINE), line
    assert "# The demo: Fashion-MNIST" in text  # DVC kept the comments
    params = load_params(root / "params.yaml")
    assert params.compute.mixed_precision == "no"
    assert (params.train_vae.kl_weight, params.train_ldm.loop.lr) == (1e-05, 1e-4)
    assert _per_class(root / "data/prepared/manifest.json") == {4}
    assert run(["gmpipe", "check-params"], root).stdout == "params.yaml: ok\n"

    shown = _experiments(root)["four-per-class"]
    assert shown["prepare"]["max_per_class"] == 4 and shown["compute"]["mixed_precision"] == "no"
    assert shown["train_vae"]["kl_weight"] == 1e-05
    print(f"dvc exp run prepare -S ...: {seconds:.1f} s")


@pytest.mark.slow
def test_dvc_exp_queue_then_queue_start(prefect_api, dvc_project):
    """configs/smoke.yaml (train_vae cut to 4 steps), two `train_vae` experiments queued with different learning
    rates and run by one `dvc queue start` in DVC's temporary workspaces: both found in `dvc exp show` with their
    params and their metrics side by side (the project's .gitignore lets the experiment commits carry them),
    compared by `dvc exp diff`, and one applied."""
    params = yaml_io.load_for_update(shipped_params_text("configs/smoke.yaml"), "configs/smoke.yaml")
    params["train_vae"].update(steps=4, warmup_steps=1, checkpoint_every=4, disc_start=2, eval_images=20,
                               perceptual_weight=0.0)
    root = dvc_project(yaml_io.dump_for_update(params))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # the project's own: metrics committed, outputs ignored
    _commit(root)
    started = time.monotonic()
    run(["dvc", "exp", "run", "--queue", "train_vae", "--name", "queued", "-S", "prepare.max_per_class=3",
         "-S", "compute.mixed_precision=no", "-S", "train_vae.lr=1e-05"], root)
    run(["dvc", "exp", "run", "--queue", "train_vae", "--name", "queued-fast", "-S", "prepare.max_per_class=3",
         "-S", "train_vae.lr=0.003"], root)
    assert run(["dvc", "queue", "status"], root).stdout.count("Queued") == 2
    # The worker DVC starts outlives `dvc queue start` and holds its stdout: a captured run() would wait for it.
    with open(root / ".dvc" / "tmp" / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start"], cwd=root, env=dict(os.environ, PATH=f"{BIN}{os.pathsep}"
                       f"{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1"), stdout=log, stderr=log, check=True)
    for name in ("queued", "queued-fast"):
        status = _wait_for_queue(root, name)
    seconds = time.monotonic() - started
    assert status.count("Success") == 2, status + run(["dvc", "queue", "logs", "queued"], root, check=False).stdout

    shown = _experiments(root)["queued"]
    assert shown["prepare"]["max_per_class"] == 3 and shown["compute"]["mixed_precision"] == "no"
    assert shown["train_vae"]["lr"] == 1e-05
    assert load_params(root / "params.yaml").prepare.max_per_class == 60  # the queue leaves the workspace alone

    # `dvc exp show`: each experiment's train_vae metrics, measured in its own run.
    listed = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    metrics = {rev["name"]: rev["data"]["metrics"]["reports/train_vae/metrics.json"]["data"]
               for commit in listed for experiment in commit.get("experiments") or [] for rev in experiment["revs"]}
    assert set(metrics) == {"queued", "queued-fast"} and metrics["queued"] != metrics["queued-fast"]
    assert metrics["queued"]["step"] == metrics["queued-fast"]["step"] == 4
    diff = json.loads(run(["dvc", "exp", "diff", "queued", "queued-fast", "--json"], root).stdout)
    changed = diff["metrics"]["reports/train_vae/metrics.json"]
    assert "psnr" in changed and all({"old", "new"} <= set(value) for value in changed.values())
    lr = diff["params"]["params.yaml"]["train_vae.lr"]
    assert (lr["old"], lr["new"]) == (1e-05, 0.003)

    # Only prepare and train_vae ran, so apply also reports the outputs of the other stages as missing (exit 255);
    # what it brings back is the experiment's params.yaml and the split gmpipe made from it.
    run(["dvc", "exp", "apply", "queued"], root, check=False)
    params = load_params(root / "params.yaml")
    assert (params.prepare.max_per_class, params.compute.mixed_precision, params.train_vae.loop.lr) == (3, "no", 1e-05)
    assert _per_class(root / "data/prepared/manifest.json") == {3}
    print(f"two experiments queued (prepare + train_vae each) + dvc queue start until done: {seconds:.1f} s")


DVC_REFUSES = {  # params files DVC itself refuses to run a stage with (`dvc repro`), so gmpipe refuses them too
    "empty": b"",
    "missing-section": b"data: {}\n",
    "duplicate-key": b"data: {}\ndata: {}\n",
    "not-utf8": b"data: {path: \xff}\n",
    "date": b"data: {path: 2024-01-31}\n",
}


@pytest.fixture(scope="module")
def sections_repo(tmp_path_factory) -> Path:
    """A bare DVC repo (no git) whose one stage tracks every params section, as the shipped dvc.yaml does."""
    root = tmp_path_factory.mktemp("dvc-sections")
    run(["dvc", "init", "--no-scm", "-q"], root)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(root / ".dvc" / "site_cache")], root)
    sections = list(Params.model_fields)
    (root / "dvc.yaml").write_text(yaml_io.dump_for_update({"stages": {"noop": {"cmd": "true", "params": sections}}}))
    return root


@pytest.mark.parametrize("case", ["valid", *DVC_REFUSES])
def test_dvc_and_gmpipe_agree_on_which_files_are_params(sections_repo, case):
    content = shipped_params_text("configs/smoke.yaml").encode() if case == "valid" else DVC_REFUSES[case]
    (sections_repo / "params.yaml").write_bytes(content)
    dvc = run(["dvc", "repro", "-f"], sections_repo, check=False)
    gmpipe = main(["check-params", str(sections_repo / "params.yaml")])
    assert (dvc.returncode == 0, gmpipe) == ((True, 0) if case == "valid" else (False, 2)), dvc.stdout + dvc.stderr


def _declared_outputs() -> dict[str, bool]:
    """Every output path dvc.yaml declares (outs, metrics, plots of each stage): True when DVC caches it, False for
    `cache: false` ones, which git must track for DVC to compare them across commits and experiments."""
    stages = yaml_io.load((REPO / "dvc.yaml").read_text(), "dvc.yaml")["stages"]
    declared = {}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                declared[path] = options.get("cache", True) and not options.get("persist", False)
    return declared


def test_git_keeps_what_dvc_compares_and_ignores_the_rest(tmp_path):
    """With the project's .gitignore: every `cache: false` metrics file and loss curve is committable (and an
    experiment commit carries it); cached outputs, checkpoints and the report's big files are ignored."""
    run(["git", "init", "-q"], tmp_path)
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    committed, ignored = [], []
    for path, cached in _declared_outputs().items():
        if path.startswith("checkpoints/"):
            ignored.append(f"{path}/step-00000010/model.safetensors")  # persist: true, cache: false, but big
        elif cached:
            ignored.append(path if "." in Path(path).name else f"{path}/config.json")
        elif path.endswith("/live/plots/metrics"):
            committed.append(f"{path}/vae/kl.tsv")
        else:
            committed.append(path)
    ignored += ["reports/evaluate/grids/teacher_w1.png", "reports/evaluate/samples/teacher_n1000_w1.npz",
                "reports/report.html", "data/prepared/train.npz", "dvc_plots/index.html"]
    assert "reports/metrics.json" in committed and "reports/train_ldm/metrics.json" in committed
    for path in committed + ignored:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    listed = run(["git", "ls-files", "--others", "--exclude-standard"], tmp_path).stdout.split()
    assert sorted(listed) == sorted([".gitignore", *committed])

