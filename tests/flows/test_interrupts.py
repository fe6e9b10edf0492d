"""Ctrl-C and SIGTERM during a training stage of a real `gmpipe pipeline` (its own local Prefect server, dvc, the
stage): it stops within seconds with 130 or 143, prints no traceback, leaves no process behind (server included),
and the next run finishes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.conftest import run, smoke_params

STOP_WITHIN_SECONDS = 20  # measured on 2 busy cores: 2.7-3.0 s after SIGINT, 2.1-2.3 s after SIGTERM


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default disposition in the pipeline, as in a terminal: a test session started in the
    background by a non-interactive shell ignores SIGINT, and every process it starts would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("stop_signal", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
@pytest.mark.slow
def test_an_interrupted_pipeline_stops_its_stage_and_its_server(stop_signal, exit_code, prefect_api, dvc_project,
                                                                 tmp_path):
    from tests.flows.runs import kill_session, processes_inside, unconfigured_env

    long_training = {"steps": 100_000, "checkpoint_every": 100_000, "log_every": 1, "warmup_steps": 0,
                     "eval_images": 16}
    root = dvc_project(smoke_params(prepare={"max_per_class": 2}, compute={"threads": 1}, train_vae=long_training))
    run(["gmpipe", "stage", "prepare"], root)
    output = tmp_path / "pipeline.log"
    with open(output, "wb") as log:  # no Prefect API configured: gmpipe starts a server, and must stop it
        pipeline = subprocess.Popen(["gmpipe", "pipeline", "train_vae"], cwd=root,
                                    env=unconfigured_env(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 300
        while "train_vae: step 1/100000" not in output.read_text() and pipeline.poll() is None:
            assert time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.2)
        sent = time.monotonic()
        if stop_signal == signal.SIGINT:
            os.killpg(pipeline.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
        else:
            pipeline.send_signal(signal.SIGTERM)  # a supervisor's SIGTERM: gmpipe alone
        code = pipeline.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if pipeline.poll() is None:
            kill_session(pipeline.pid)
    text = output.read_text()
    assert code == exit_code, text[-3000:]
    assert took < STOP_WITHIN_SECONDS, f"{took:.1f} s"
    print(f"{stop_signal.name}: exit {code} {took:.1f} s after the signal")
    assert "pipeline interrupted; its stage was stopped" in text.splitlines()[-1]
    for noise in ("Traceback", "Error logging to API", "ConnectError", "Connection refused"):
        assert noise not in text, text[-3000:]
    assert processes_inside(root) == []  # server, dvc, the stage: all gone
    server = re.search(r"Prefect UI at (http://127\.0\.0\.1:\d+)", text).group(1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server}/api/health", timeout=2)

    if stop_signal == signal.SIGINT:  # and the next run (on the session's server) finishes
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train_vae"].update(steps=3, checkpoint_every=3)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rerun = run(["gmpipe", "pipeline", "train_vae"], root)
        assert "| train_vae | ran |" in rerun.stdout
        assert (root / "models/vae").is_dir()
