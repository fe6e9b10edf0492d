"""How torch's OpenMP threads wait: gmpipe makes them spin (``OMP_WAIT_POLICY=ACTIVE``, the fastest policy on a machine
to itself, ``bench.thread_policy``) unless the user chose a policy; the bench's cases reach its workers."""

from __future__ import annotations

import os
import subprocess
import sys

from bench import thread_policy
from tests.conftest import REPO

PRINT_POLICY = "import gmpipe, os; print(os.environ['OMP_WAIT_POLICY'])"


def policy_after_import(env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", PRINT_POLICY], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True)
    return result.stdout.strip()


def test_gmpipe_makes_waiting_threads_spin_by_default():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert policy_after_import(env) == "ACTIVE"


def test_a_policy_the_user_set_wins():
    assert policy_after_import({**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE"


def test_each_bench_case_sets_or_removes_the_policy_for_its_worker(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name, setting in thread_policy.SETTINGS.items():
        env = thread_policy._environment(setting)
        assert env["OMP_NUM_THREADS"] == setting["OMP_NUM_THREADS"], name
        assert env.get("OMP_WAIT_POLICY") == setting["OMP_WAIT_POLICY"], name
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # the bench's own process is left as it was


def test_a_worker_reports_the_seconds_of_a_train_vae_step():
    size = thread_policy.SIZES["quick"]
    seconds = thread_policy.measure(thread_policy.SETTINGS["1 thread"], "alone", size)
    assert 0 < seconds < 60
