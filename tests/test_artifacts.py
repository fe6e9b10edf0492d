"""atomic_dir under concurrent writers and after killed ones: one complete version, no stray folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmpipe.artifacts import atomic_dir
from tests.conftest import REPO

# Each writer replaces the folder many times with a version of 3 files that all carry the writer's id and round,
# so a half-swapped or mixed folder would show.
WRITER = """
import sys
from pathlib import Path
from gmpipe.artifacts import atomic_dir
target, writer = Path(sys.argv[1]), sys.argv[2]
for round_ in range(int(sys.argv[3])):
    with atomic_dir(target) as out:
        for i in range(3):
            (out / f"part{i}.txt").write_text(f"{writer}:{round_}")
"""


def _versions(folder: Path) -> set[str]:
    return {file.read_text() for file in folder.iterdir()}


def test_concurrent_writers_both_succeed_and_leave_one_complete_version(tmp_path):
    target = tmp_path / "data" / "prepared"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), name, "300"], env=env,
                                stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [writer.communicate(timeout=120)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], errors
    assert len(_versions(target)) == 1 and len(list(target.iterdir())) == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["prepared"]  # no .tmp-* or .old-* left


def test_a_writer_that_starts_between_the_two_renames_of_another(tmp_path, monkeypatch):
    """The interleaving that once left the loser with a raw 'Directory not empty' and a stray temporary folder:
    writer B runs its whole atomic_dir just after writer A moved the old version aside."""
    import threading

    from gmpipe import artifacts

    target = tmp_path / "prepared"
    with atomic_dir(target) as out:
        (out / "v.txt").write_text("old")
    real_replace, started, errors = os.replace, [], []

    def writer_b():
        try:
            with atomic_dir(target) as out:
                (out / "v.txt").write_text("b")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def replace(src, dst):
        real_replace(src, dst)
        if Path(src) == target and not started:  # A has just moved the old version aside
            started.append(threading.Thread(target=writer_b))
            started[0].start()
            started[0].join(timeout=1.0)  # B finishes here unless a lock makes it wait for A

    monkeypatch.setattr(artifacts.os, "replace", replace)
    with atomic_dir(target) as out:
        (out / "v.txt").write_text("a")
    started[0].join(timeout=30)
    assert not errors
    assert (target / "v.txt").read_text() in ("a", "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as out:
        (out / "a.txt").write_text("good")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its folders are leftovers
    import socket

    host = socket.gethostname().replace("-", "_")
    for kind in ("tmp", "old"):
        (tmp_path / f".prepared.{kind}-{host}-{pid}-abc").mkdir()
    live = tmp_path / f".prepared.tmp-{host}-{os.getpid()}-xyz"  # a writer still running keeps its folder
    live.mkdir()
    with atomic_dir(target) as out:
        (out / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["prepared", live.name])


def test_a_run_killed_between_the_renames_is_repaired(tmp_path):
    target = tmp_path / "prepared"
    backup = tmp_path / ".prepared.old-otherhost-1-abc"
    backup.mkdir()
    (backup / "a.txt").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(target):
        assert (target / "a.txt").read_text() == "previous"  # put back before the new version is written
        raise RuntimeError("the new run fails too")
    assert (target / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
