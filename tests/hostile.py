"""Helpers for the bad-input tests: run a command under a memory limit and a timeout, measure it, and check that
what it said is one clear line; build a small, real (untrained) model folder to damage."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import BIN

MEMORY_LIMIT = 1536 * 2**20  # address space of the child, bytes


@dataclass
class Limited:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes, of the child process alone
    timed_out: bool

    def error_lines(self) -> list[str]:
        return [line for line in (self.stdout + self.stderr).splitlines() if "gmpipe: error:" in line]


def run_limited(command: list[str], cwd: Path, memory: int = MEMORY_LIMIT, timeout: float = 120) -> Limited:
    """Run ``command`` with RLIMIT_AS = ``memory`` and kill its process group after ``timeout`` seconds."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, preexec_fn=limit,
                                   start_new_session=True)
        timed_out = []
        timer = threading.Timer(timeout, lambda: (timed_out.append(True), os.killpg(process.pid, signal.SIGKILL)))
        timer.start()
        peak = _watch_peak_memory(process.pid)
        _, status, _ = os.wait4(process.pid, 0)
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Limited(process.returncode, out.read(), err.read(), peak(), bool(timed_out))


def _watch_peak_memory(pid: int):
    """Sample the child's VmHWM (peak resident memory of the program it runs) every 20 ms until it exits.

    Not ``ru_maxrss``: the child is forked from the test process (``preexec_fn`` sets the limit), and the kernel
    counts the forked copy's resident pages, i.e. however large pytest has grown, in the child's ``ru_maxrss``.
    VmHWM starts afresh at ``exec``."""
    seen = [0]

    def watch():
        status = Path(f"/proc/{pid}/status")
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            if "State:\tZ" in text:
                return
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    seen[0] = max(seen[0], int(line.split()[1]) * 1024)
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return lambda: (thread.join(1.0), seen[0])[1]


def assert_one_clear_line(result: Limited, *names: str) -> str:
    """Exit 1, exactly one ``gmpipe: error:`` line naming every one of ``names``, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = result.error_lines()
    assert len(lines) == 1, lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_model_folders(root: Path, mode: str = "class", class_names=("a", "b")) -> tuple[Path, Path]:
    """A real (untrained) ``models/vae`` and ``models/ldm`` in the layout the stages write: 1-channel 8x8 images,
    4x4x4 latents, a tiny DiT. Returns (ldm, vae)."""
    import torch

    from gmpipe.conditioning import Conditioning
    from gmpipe.data.latents import LatentStats
    from gmpipe.diffusion import Objective
    from gmpipe.latent_diffusion import LatentDiffusion
    from gmpipe.nn.autoencoder import build_autoencoder_preset

    torch.manual_seed(0)
    vae_dir, ldm_dir = root / "models" / "vae", root / "models" / "ldm"
    build_autoencoder_preset("tiny", 1).save_pretrained(vae_dir, safe_serialization=True)
    conditioning = Conditioning.from_config({"mode": mode, "class_names": list(class_names)})
    model = LatentDiffusion(conditioning.make_denoiser((4, 4, 4), "tiny"),
                            Objective.from_config({"schedule": "rectified_flow", "target": "velocity"}),
                            LatentStats((0.0,) * 4, (1.0,) * 4), conditioning,
                            {"sampler": "euler", "steps": 3, "guidance": 1.0})
    model.save(ldm_dir, "train_ldm")
    return ldm_dir, vae_dir


def write_student_folder(ldm_dir: Path, student_dir: Path) -> Path:
    """A copy of ``ldm_dir`` laid out as a distilled student (``student.json`` beside the bundle)."""
    import shutil

    from gmpipe.distill.student import write_student_info
    from gmpipe.generator import FAMILY_FILE

    shutil.copytree(ldm_dir, student_dir)
    family = json.loads((student_dir / FAMILY_FILE).read_text())
    (student_dir / FAMILY_FILE).write_text(json.dumps({**family, "stage": "distill"}))
    write_student_info(student_dir, method="reflow", steps=[1, 2], guidance_folded=1.0, nfe_per_step=1)
    return student_dir
