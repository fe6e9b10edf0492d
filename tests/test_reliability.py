"""Reliability, for real: kill -9 and resume, determinism, bad input, concurrency, write failures, safe defaults."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gmpipe.cli import main
from gmpipe.config.params import Params, ParamsError, parse_params
from gmpipe.errors import GmpipeError
from gmpipe.paths import Paths
from gmpipe.stages import prepare, train_vae
from gmpipe.train import checkpoint as checkpoint_module
from gmpipe.train.checkpoint import latest_checkpoint
from tests.conftest import BIN, run, smoke_params

# Longer training and frequent checkpoints, so that a kill lands mid-run.
KILL_PARAMS = {
    "train_vae": {"steps": 40, "checkpoint_every": 5, "disc_start": 10, "eval_images": 50},
    "train_ldm": {"steps": 80, "checkpoint_every": 10, "grid_per_class": 1},
    "distill": {"methods": ["reflow"], "steps": 80, "checkpoint_every": 10, "reflow_pairs": 64},
    "prepare": {"max_per_class": 20},
}


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def _kill_after_first_checkpoint(process: subprocess.Popen, checkpoints: Path, rng: random.Random) -> int:
    """SIGKILL the whole process group at a random moment after the first checkpoint; returns its step."""
    deadline = time.monotonic() + 300
    while latest_checkpoint(checkpoints) is None:
        assert process.poll() is None, f"finished before its first checkpoint:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return int(latest_checkpoint(checkpoints).name.split("-")[1])


@pytest.mark.slow
def test_kill_nine_each_training_stage_then_dvc_repro_resumes(prefect_api, dvc_project):
    rng = random.Random(os.getpid())
    root = dvc_project(smoke_params(**KILL_PARAMS))
    run(["dvc", "repro", "prepare"], root)
    figures = {}
    for stage, upstream in (("train_vae", None), ("train_ldm", "cache_latents"), ("distill", None)):
        if upstream:
            run(["dvc", "repro", upstream], root)
        checkpoints = root / "checkpoints" / stage
        if stage == "distill":
            checkpoints = checkpoints / "reflow"
        process = _start(["dvc", "repro", "--single-item", stage], root)
        killed_at = _kill_after_first_checkpoint(process, checkpoints, rng)
        total = KILL_PARAMS[stage]["steps"]
        assert killed_at < total, f"{stage} finished before the kill"
        # No half-written output: the stage's model folder does not exist yet (or is complete).
        model = {"train_vae": "models/vae", "train_ldm": "models/ldm", "distill": "models/student"}[stage]
        assert not (root / model).exists()
        resumed = run(["dvc", "repro", "--single-item", stage], root)
        log = resumed.stdout + resumed.stderr
        assert f"(step {killed_at})" in log or "resuming from" in log, log[-3000:]
        assert latest_checkpoint(checkpoints).name == f"step-{total:08d}"
        assert (root / model).is_dir()
        figures[stage] = killed_at
    print("killed at steps", figures)


def test_same_seed_same_metrics(tmp_path):
    """Two runs with the same seed and params give the same metrics on CPU (tolerance: 1e-6 relative)."""
    params = parse_params(smoke_params(prepare={"max_per_class": 10},
                                       train_vae={"steps": 12, "disc_start": 6, "eval_images": 40}))
    results = []
    for name in ("a", "b"):
        paths = Paths(tmp_path / name)
        prepare.run(params.data, params.prepare, paths)
        train_vae.run(params.data, params.train_vae, params.compute, paths)
        results.append(json.loads((paths.reports / "train_vae/metrics.json").read_text()))
    for key, value in results[0].items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-6)  # e.g. mixed_precision
        assert results[1][key] == expected, key


# Property-based: any edit of a valid params file is either valid or a clean exit-2 error.
_FIELDS = [(section, key) for section, model in Params.model_fields.items()
           for key in sorted(model.annotation.flat_fields())]
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(
                        st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_VALUES)
def test_any_single_edit_is_valid_or_a_clear_error(tmp_path, capsys, field, value):
    raw = smoke_params()
    raw.setdefault(field[0], {})[field[1]] = value
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(raw))
    code = main(["check-params", str(file)])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        for line in err.strip().splitlines():
            assert line.startswith(f"{file}: {field[0]}"), line


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), section=st.sampled_from(
    list(Params.model_fields)))
@example(section="train_vae", key="grad_accum").via("a loop key, written flat in the section")
@example(section="train_ldm", key="objective").via("a part's name")
def test_unknown_keys_are_always_errors(section, key):
    if key in Params.model_fields[section].annotation.flat_fields():
        return
    with pytest.raises(ParamsError) as info:
        parse_params({section: {key: 1}})
    # A composed section's part names ("loop") are refused too, with a hint that their keys are written flat.
    assert any(problem.startswith(f"{section}.{key}: unknown key") for problem in info.value.problems), \
        info.value.problems


@pytest.mark.parametrize("section", list(Params.model_fields))
def test_flat_fields_are_the_keys_params_files_use(section):
    model = Params.model_fields[section].annotation
    keys = set(model.flat_fields())
    assert keys == set(model().model_dump())  # what a dump writes and fingerprints name
    assert not keys & set(getattr(model, "flat_parts", ()))
    if section == "train_vae":
        assert {"grad_accum", "steps", "lr", "disc_start"} <= keys
        parse_params({"train_vae": dict.fromkeys(["grad_accum", "steps"], 1)})  # both accepted


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_files_never_crash_check_params(tmp_path, capsys, text):
    file = tmp_path / "params.yaml"
    file.write_text(text)
    code = main(["check-params", str(file)])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err


def test_missing_upstream_names_the_stage_to_run(tmp_path):
    params = parse_params(smoke_params())
    paths = Paths(tmp_path)
    from gmpipe.stages import distill

    with pytest.raises(GmpipeError, match="run the 'prepare' stage first"):
        train_vae.run(params.data, params.train_vae, params.compute, paths)
    with pytest.raises(GmpipeError, match="run the 'train_ldm' stage first"):
        distill.run(params.distill, params.compute, paths)


@pytest.mark.slow
def test_second_dvc_repro_fails_fast_while_one_runs(prefect_api, dvc_project):
    root = dvc_project(smoke_params(prepare={"max_per_class": 20}, train_vae={"steps": 60, "checkpoint_every": 30}))
    run(["dvc", "repro", "prepare"], root)
    first = _start(["dvc", "repro", "train_vae"], root)
    deadline = time.monotonic() + 120
    while not (root / "checkpoints").exists() and time.monotonic() < deadline:  # the stage is running
        time.sleep(0.1)
    started = time.monotonic()
    second = run(["dvc", "repro", "train_vae"], root, check=False)
    assert second.returncode != 0 and time.monotonic() - started < 30
    assert "lock" in (second.stdout + second.stderr).lower()
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-3000:]
    assert json.loads((root / "reports/train_vae/metrics.json").read_text())["step"] == 60


def test_full_disk_during_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    from gmpipe.config.loop import LoopConfig
    from gmpipe.train.loop import LossStep, train

    model = torch.nn.Linear(2, 1)
    step = LossStep("model", model, lambda batch, s, c, m: ((m["model"](batch) ** 2).mean(), {}))
    data = torch.randn(32, 2)
    config = LoopConfig(steps=4, batch_size=8, checkpoint_every=2, log_every=2)
    train(config, [step], 32, lambda i, d: data[i], tmp_path / "ckpt")
    real_save = checkpoint_module.save_file

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(GmpipeError, match="No space left on device.*step-00000004 is intact"):
        train(config.model_copy(update={"steps": 6}), [step], 32, lambda i, d: data[i], tmp_path / "ckpt")
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000004"
    assert not list((tmp_path / "ckpt").glob(".step-*"))
    checkpoint_module.read_checkpoint(latest_checkpoint(tmp_path / "ckpt"), ["model"])


def test_full_disk_during_an_artifact_write_keeps_the_previous_artifact(tmp_path, monkeypatch):
    params = parse_params(smoke_params(prepare={"max_per_class": 3}))
    paths = Paths(tmp_path)
    prepare.run(params.data, params.prepare, paths)
    before = (paths.prepared / "manifest.json").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("gmpipe.stages.prepare.write_split", full_disk)
    with pytest.raises(GmpipeError, match="could not be written .*previous version, if any, is intact"):
        prepare.run(params.data, params.prepare.model_copy(update={"max_per_class": 4}), paths)
    assert (paths.prepared / "manifest.json").read_text() == before
    assert [p.name for p in paths.prepared.parent.iterdir()] == ["prepared"]


def test_servers_listen_on_loopback_and_secrets_stay_out(prefect_api, dvc_project):
    import inspect

    from flows.server import local_server

    assert inspect.signature(local_server).parameters["host"].default == "127.0.0.1"
    assert prefect_api.startswith("http://127.0.0.1:")
    secret = "sk-test-not-a-real-secret-0123456789"
    root = dvc_project(smoke_params(prepare={"max_per_class": 3}))
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=secret, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["gmpipe", "stage", "prepare"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0
    assert secret not in result.stdout + result.stderr
    written = [p.read_bytes() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    assert not any(secret.encode() in blob for blob in written)
