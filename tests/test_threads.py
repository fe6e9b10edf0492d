"""How torch's OpenMP threads wait: gmpipe makes them spin (``OMP_WAIT_POLICY=ACTIVE``, the fastest policy on a machine
to itself, ``bench.thread_policy``) unless the user chose a policy; the bench's cases reach its workers."""

from __future__ import annotations

import os
import subprocess
import sys

from bench import thread_policy
from tests.conftest import REPO

PRINT_POLICY = "import gmpipe, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
OPENMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def policy_after_import(**user: str) -> tuple[str, str]:
    """(OMP_WAIT_POLICY, GOMP_SPINCOUNT) after ``import gmpipe`` in a process started with only ``user``'s values."""
    env = {**{k: v for k, v in os.environ.items() if k not in OPENMP_KEYS}, **user}
    result = subprocess.run([sys.executable, "-c", PRINT_POLICY], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True)
    policy, spin = result.stdout.split()
    return policy, spin


def test_gmpipe_makes_waiting_threads_spin_for_a_bounded_time_by_default():
    import gmpipe

    assert policy_after_import() == ("ACTIVE", gmpipe.SPIN_COUNT)
    assert gmpipe.SPIN_COUNT == thread_policy.SPIN_COUNT  # the bench measures the default gmpipe ships


def test_a_policy_or_spin_count_the_user_set_wins():
    assert policy_after_import(OMP_WAIT_POLICY="PASSIVE") == ("PASSIVE", "None")  # no spin added to PASSIVE
    assert policy_after_import(GOMP_SPINCOUNT="1000") == ("ACTIVE", "1000")


def test_each_bench_case_sets_or_removes_the_policy_for_its_worker(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name, setting in thread_policy.SETTINGS.items():
        env = thread_policy._environment(setting)
        for key in ("OMP_NUM_THREADS", *OPENMP_KEYS):
            assert env.get(key) == setting[key], (name, key)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # the bench's own process is left as it was


def test_a_worker_reports_the_seconds_of_a_train_vae_step():
    size = thread_policy.SIZES["quick"]
    seconds = thread_policy.measure(thread_policy.SETTINGS["1 thread"], "alone", size)
    assert 0 < seconds < 60
