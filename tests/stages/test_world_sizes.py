"""Every training stage through the stage flow on 2 CPU processes, then resumed on 1 with more steps: train_vae
(with its discriminator) and every distill method here; train_ldm in tests/stages/test_latent_stages.py. While the
two-process run is up, every socket it listens on is on loopback."""

from __future__ import annotations

import json

import pytest
import yaml
from diffusers import AutoencoderKL

from gmpipe.config.params import parse_params
from gmpipe.paths import Paths
from gmpipe.rendezvous import free_port
from gmpipe.stages import cache_latents, prepare, train_ldm
from tests.conftest import smoke_params
from tests.listening import ListeningWatch

DISTILL_RUNS = ("progressive-2", "progressive-1", "reflow", "consistency", "guidance")  # checkpoint folders


def _edit_params(root, **sections) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _world_size(checkpoints, step: int) -> int:
    return json.loads((checkpoints / f"step-{step:08d}" / "trainer.json").read_text())["world_size"]


def _run(stage: str, root) -> dict:
    from flows.stages import run_stage

    state = run_stage(stage, "params.yaml", str(root))
    assert state.is_completed(), state.message
    return state.result()


@pytest.mark.slow
def test_train_vae_and_every_distill_method_on_two_processes_then_resume_on_one(tmp_path, prefect_api):
    root, port = tmp_path, free_port()
    raw = smoke_params(
        prepare={"max_per_class": 10},
        compute={"num_processes": 2, "threads": 1, "main_process_port": port},
        train_vae={"steps": 4, "warmup_steps": 1, "disc_start": 2, "checkpoint_every": 2, "log_every": 2,
                   "eval_images": 20},
        train_ldm={"steps": 4, "warmup_steps": 1, "checkpoint_every": 4, "log_every": 2, "grid_per_class": 1},
        distill={"methods": ["progressive", "reflow", "consistency", "guidance"], "progressive_start_steps": 2,
                 "reflow_pairs": 16, "steps": 2, "checkpoint_every": 2, "log_every": 2},
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params, paths = parse_params(raw), Paths(root)
    prepare.run(params.data, params.prepare, paths)

    # train_vae on 2 processes, GAN on from step 2, watching what the run listens on.
    with ListeningWatch(str(root)) as watch:
        summary = _run("train_vae", root)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert _world_size(paths.checkpoints / "train_vae", 4) == 2
    assert AutoencoderKL.from_pretrained(paths.vae).config.latent_channels == 4  # a plain diffusers folder
    assert len(watch.processes) >= 3, watch.processes  # the launcher and two ranks
    assert ("127.0.0.1", port) in watch.addresses, watch.addresses  # the rendezvous store
    assert {address for address, _ in watch.addresses} == {"127.0.0.1"}, watch.addresses

    # Resumed on 1 process with more steps: the 2-process checkpoint is where it continues from.
    _edit_params(root, compute={"num_processes": 1}, train_vae={"steps": 6})
    summary = _run("train_vae", root)
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    assert _world_size(paths.checkpoints / "train_vae", 4) == 2 and _world_size(paths.checkpoints / "train_vae", 6) == 1

    # A teacher on 1 process (in this process), then every distill method on 2 processes.
    params = parse_params(yaml.safe_load((root / "params.yaml").read_text()))
    cache_latents.run(params.cache_latents, params.compute.device, params.compute.threads, paths)
    train_ldm.run(params.train_ldm, params.compute, paths)
    _edit_params(root, compute={"num_processes": 2})
    summary = _run("distill", root)
    students = ["progressive-2step", "progressive-1step", "reflow", "consistency", "guidance"]
    assert summary["world_size"] == 2 and summary["students"] == students
    for run in DISTILL_RUNS:
        assert _world_size(paths.checkpoints / "distill" / run, 2) == 2, run

    # Every method resumes from its 2-process checkpoint on 1 process. The last progressive round is the
    # exception, by design: its teacher (the round before, now trained longer) changed, so it starts over.
    _edit_params(root, compute={"num_processes": 1}, distill={"steps": 4})
    summary = _run("distill", root)
    assert summary["students"] == students
    for run in DISTILL_RUNS:
        checkpoints = paths.checkpoints / "distill" / run
        expected = (1, 1) if run == "progressive-1" else (2, 1)
        assert (_world_size(checkpoints, 2), _world_size(checkpoints, 4)) == expected, run
    assert _world_size(paths.checkpoints / "distill" / "progressive-1.stale", 2) == 2
    for student in students:
        assert json.loads((paths.student / student / "student.json").read_text())["train_steps"] == 4
