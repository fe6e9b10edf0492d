"""Resuming on several processes: all must resume from the same checkpoint, and each keeps its own noise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from gmpipe.errors import GmpipeError
from gmpipe.train.loop import train
from tests.conftest import REPO
from tests.train.test_loop import X, _config, _make_batch, _regression_step


def _worker(directory: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # debug_launcher forks: drop the single-process state the parent interpreter may hold.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank, directory = accelerator.process_index, Path(directory)

    def run(checkpoints: Path, steps: int):
        torch.manual_seed(1)
        return train(_config(steps=steps), [_regression_step(nn.Linear(4, 1))], len(X), _make_batch, checkpoints,
                     accelerator=accelerator, ema_of="model")

    # Each process reads "its own disk": only process 0 sees the checkpoint at step 2.
    try:
        run(directory / f"disk{rank}", 4)
        outcome = "trained"
    except GmpipeError as exc:
        outcome = str(exc)
    # The same checkpoint for both: they resume together, then draw different noise.
    run(directory / "disk0", 4)
    noise = accelerator.gather(torch.randn(1, 3))
    (directory / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "noise": noise.tolist()}))


def test_processes_that_see_different_checkpoints_stop_and_shared_ones_resume(tmp_path):
    """Two CPU ranks through accelerate.debug_launcher (in a fresh interpreter: it forks)."""
    torch.manual_seed(1)
    train(_config(steps=2), [_regression_step(nn.Linear(4, 1))], len(X), _make_batch, tmp_path / "disk0",
          ema_of="model")
    script = (
        "from accelerate import debug_launcher; from tests.train.test_multi_process_resume import _worker; "
        f"debug_launcher(_worker, args=({str(tmp_path)!r},), num_processes=2)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["outcome"] == (
            f"{tmp_path / f'disk{rank}'}: the processes would resume from different steps (process 0 from step 2, "
            f"the others from [0]); every machine must see the same checkpoints: put {tmp_path / f'disk{rank}'} on "
            "storage all machines share, or copy it to each"
        )
        noise_0, noise_1 = report["noise"]
        assert noise_0 != noise_1  # process 1 does not replay process 0's restored noise stream
    assert not (tmp_path / "disk1").exists()  # the stopped run wrote nothing
    assert (tmp_path / "disk0" / "step-00000004").is_dir()
