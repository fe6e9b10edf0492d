"""The teacher-quality study (``python -m bench.teacher_quality``): it measures a project's teacher as ``evaluate``
does, and with overrides trains it again first."""

from __future__ import annotations

import json

import yaml

from bench import teacher_quality
from gmpipe.config.params import parse_params
from gmpipe.paths import Paths
from gmpipe.stages import cache_latents, evaluate, prepare, train_ldm, train_vae
from tests.conftest import smoke_params


def test_the_study_reproduces_evaluates_teacher_rows_and_retrains_with_overrides(tmp_path, capsys):
    raw = smoke_params(prepare={"max_per_class": 10}, train_vae={"steps": 6, "disc_start": 3},
                       train_ldm={"steps": 6}, evaluate={"n_samples": 30, "sweep_samples": 20, "classifier_steps": 5,
                                                         "guidance_sweep": [0.5, 1.0], "sweep_samplers": ["euler"],
                                                         "sweep_steps": [2], "likelihood_samples": 0})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params, paths = parse_params(raw), Paths(tmp_path)
    prepare.run(params.data, params.prepare, paths)
    train_vae.run(params.data, params.train_vae, params.compute, paths)
    cache_latents.run(params.cache_latents, params.compute.device, params.compute.threads, paths)
    train_ldm.run(params.train_ldm, params.compute, paths)
    evaluate.run(params.evaluate, params.compute.device, params.compute.threads, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())

    study = teacher_quality.measure_teacher(tmp_path)
    assert study["n"] == 30 and study["floor"] == metrics["floor"]["30"]["fd_effnet"]
    assert set(study["by_w"]) == {"0.5", "1"}
    headline = metrics["teacher"]
    row = study["by_w"][f"{headline['w']:g}"]
    for key in teacher_quality.REPORTED:
        assert row[key] == headline[key], key
    assert row["x_floor"] == headline["fd_ratio_to_floor"]
    # other weights on request (bench.guidance_interval's), each row the same as among the defaults
    alone = teacher_quality.measure_teacher(tmp_path, guidance=(1.0,))
    assert set(alone["by_w"]) == {"1"} and alone["by_w"]["1"] == study["by_w"]["1"]

    teacher_quality.main([str(tmp_path), '{"steps": 8}'])
    assert json.loads((paths.reports / "train_ldm" / "metrics.json").read_text())["step"] == 8
    printed = capsys.readouterr().out
    retrained = json.loads(printed[printed.index("{"):])
    assert retrained["by_w"][f"{headline['w']:g}"]["fd_effnet"] != row["fd_effnet"]  # a different teacher
