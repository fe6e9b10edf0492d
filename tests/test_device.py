"""``compute.device`` for the stages that only run networks (cache_latents, evaluate) and ``gmpipe sample --device``.

There is no GPU here: ``device: cuda`` is tested to fail at once with one line (CUDA hidden with
CUDA_VISIBLE_DEVICES="" so the test means the same on a GPU machine); ``device: cpu`` runs in
tests/stages/test_latent_stages.py (the stages with "cpu", `gmpipe sample --device cpu`)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml

from gmpipe.cli import main
from gmpipe.device import available_memory_bytes, resolve_device
from gmpipe.errors import GmpipeError
from gmpipe.procfs import kib_field
from tests.conftest import BIN, smoke_params

NO_CUDA = ("compute.device: cuda requested but this torch build has no CUDA support; use cpu or auto",
           "compute.device: cuda requested but no CUDA device is visible; use cpu or auto")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GmpipeError, match="--device: must be one of auto, cpu, cuda"):
        resolve_device("tpu", key="--device")


@pytest.mark.parametrize("stage", ["cache_latents", "evaluate"])
def test_cuda_without_cuda_fails_in_one_line_before_any_work(stage, tmp_path, prefect_api):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(smoke_params(compute={"device": "cuda"})))
    existing = tmp_path / "data" / "latents" / "stats.json"
    existing.parent.mkdir(parents=True)
    existing.write_text("{}")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["gmpipe", "stage", stage, "--root", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last in {f"gmpipe: error: stage '{stage}' failed: {message}" for message in NO_CUDA}, result.stderr
    assert existing.read_text() == "{}"


def test_sample_on_cuda_without_cuda_fails_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", str(tmp_path / "no-model"), "--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err in {"gmpipe: error: " + m.replace("compute.device", "--device") for m in NO_CUDA}
    assert not out.exists()


def test_network_only_stages_run_in_one_process_and_read_only_the_device_and_threads():
    from gmpipe.config.params import parse_params
    from gmpipe.stages.runner import declared_params, needs_launcher, stage_module

    params = parse_params(smoke_params(compute={"num_processes": 2, "device": "cpu"}))
    assert [needs_launcher(s, params) for s in ("train_vae", "cache_latents", "train_ldm", "distill", "evaluate")] == [
        True, False, True, True, False]
    for stage in ("cache_latents", "evaluate"):
        assert stage_module(stage).SECTIONS[1:] == ("compute.device", "compute.threads")
    assert declared_params(params, "compute.device") == "cpu" and declared_params(params, "compute").world_size == 2


def test_memory_lines_of_proc_files(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   12288000 kB\n")
    assert available_memory_bytes(meminfo) == 12288000 * 1024
    assert kib_field(meminfo, "MemFree") == 100 and kib_field(meminfo, "Mem") is None  # whole field names only
    meminfo.write_text("MemTotal: 1 kB\n")
    assert available_memory_bytes(meminfo) is None  # an older kernel without the line
    meminfo.write_text("MemAvailable: lots\n")
    assert available_memory_bytes(meminfo) is None
    assert available_memory_bytes(tmp_path / "absent") is None  # not Linux
    status = tmp_path / "status"
    status.write_bytes(b"Name:\tgmpipe-\xc3\n" + b"VmHWM:\t  2048 kB\n")  # a name cut inside a UTF-8 character
    assert kib_field(status, "VmHWM") == 2048
    if os.path.exists("/proc/self/status"):
        assert kib_field("/proc/self/status", "VmRSS") > 0
