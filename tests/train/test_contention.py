"""Other processes on the training cores: /proc/stat read for the run's CPUs, their share net of the run's own CPU
time, one line naming compute.threads when it exceeds what the run's threads leave free, and the loop saying it
beside a real busy process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from gmpipe.config.loop import LoopConfig
from gmpipe.train.contention import Contention, busy_seconds
from gmpipe.train.loop import LossStep, train

STAT = """cpu  900 0 900 9000 0 0 0 0 0 0
cpu0 100 5 50 4000 20 3 2 1 7 0
cpu1 300 0 100 3000 10 0 0 0 0 0
cpu2 1 1 1 1 1 1 1 1 0 0
intr 12345
"""


def test_busy_seconds_sums_the_non_idle_ticks_of_the_run_cpus(tmp_path, monkeypatch):
    """user + nice + system + irq + softirq + steal of the named cpuN lines (idle, iowait and guest, which user already
    counts, left out), in seconds; a CPU without its line, or no file, is unknown."""
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    assert busy_seconds({0, 1}, stat) == pytest.approx((100 + 5 + 50 + 3 + 2 + 1 + 300 + 100) / 100)
    assert busy_seconds({1}, stat) == pytest.approx(4.0)
    assert busy_seconds({0, 7}, stat) is None
    assert busy_seconds({0}, tmp_path / "missing") is None


class Readings:
    """Injected clock, busy time of the run's cores and the run's own CPU time, advanced by hand."""

    def __init__(self):
        self.busy = self.own = self.now = 0.0

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds


@pytest.mark.parametrize(("threads", "others", "warns"), [(2, 0.2, False), (2, 0.9, True), (1, 0.9, False),
                                                          (1, 1.6, True)])
def test_warns_once_when_others_take_the_cores_the_threads_need(threads, others, warns):
    """On 2 cores: 2 threads tolerate up to half a core of other work (a Prefect server, a shell), one thread the
    free core and half another. The line names compute.threads and comes once per run."""
    readings, lines = Readings(), []
    contention = Contention(threads, "train_vae", log=lines.append, cpus={0, 1}, busy=lambda: readings.busy,
                            own=lambda: readings.own, clock=lambda: readings.now)
    for _ in range(4):
        readings.advance(5.0, own_cores=min(threads, 2 - others), other_cores=others)
        contention.check()
        if len(lines) == 1:
            assert readings.now >= 10.0  # sustained for SUSTAINED_SECONDS first
    assert len(lines) == (1 if warns else 0)
    if warns:
        assert lines[0].startswith(f"train_vae: other processes are using {others:.1f} of the 2 cores")
        assert "compute.threads: 1" in lines[0]


def test_unknown_readings_never_warn():
    lines = []
    contention = Contention(2, "train_vae", log=lines.append, cpus={0, 1}, busy=lambda: None)
    assert contention.others() is None and contention.check() is None and not lines


def test_a_short_burst_of_other_work_does_not_warn():
    """A stage server importing beside the first steps: 6 s of a busy core, then quiet, then 6 s again: never 10 s
    in a row, so no line."""
    readings, lines = Readings(), []
    contention = Contention(2, "train_vae", log=lines.append, cpus={0, 1}, busy=lambda: readings.busy,
                            own=lambda: readings.own, clock=lambda: readings.now)
    for others in (1.0, 1.0, 0.1, 1.0, 1.0, 0.1):
        readings.advance(3.0, own_cores=2 - others, other_cores=others)
        contention.check()
    assert not lines


def test_the_loop_says_so_beside_a_busy_process(tmp_path, capsys, monkeypatch):
    """A real busy process on the run's cores while a CPU run with as many threads as cores trains (each step waits
    50 ms, so the run itself leaves the cores to the other process): the loop prints the line once (sustained for
    0.5 s here instead of 10)."""
    monkeypatch.setattr("gmpipe.train.contention.SUSTAINED_SECONDS", 0.5)
    cores = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    threads = torch.get_num_threads()
    torch.set_num_threads(max(cores, 1))
    try:
        time.sleep(0.2)
        model = nn.Linear(4, 1)

        def loss(batch, step, context, modules):
            time.sleep(0.05)
            value = modules["model"](batch).square().mean()
            return value, {"loss": value.detach()}

        config = LoopConfig(steps=30, batch_size=8, lr=0.01, log_every=5, checkpoint_every=30, ema_decay=0.0)
        train(config, [LossStep("model", model, loss)], 64, lambda index, device: torch.randn(len(index), 4),
              tmp_path / "ckpt", description="busy_test")
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("busy_test: other processes are using") == 1, out
