"""The bench sections that run models, at quick sizes: evaluate's measurement costs (before vs now, and batch sizes
with a teacher) and one-step generation end to end (random networks without a project, a project's models with
one)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import evaluate_costs, one_step_decoding, sampling
from tests.hostile import write_model_folders, write_student_folder


@pytest.fixture
def project(tmp_path):
    """Untrained tiny models in a project's layout (teacher, autoencoder, the default 1-step student), 32 real test
    images of their shape, and a small decoder folder distilled (in name) from that autoencoder."""
    from gmpipe.config.params import load_params
    from gmpipe.data.prepared import Split, captions_array, write_split
    from gmpipe.decoder_folder import autoencoder_hash, save_small_decoder
    from gmpipe.generator import load_generator
    from tests.conftest import REPO

    ldm, vae = write_model_folders(tmp_path)
    student = write_student_folder(ldm, tmp_path / "models" / "student" / one_step_decoding.STUDENT)
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    write_split(tmp_path / "data" / "prepared", "test", Split(rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8),
                                                              np.arange(32) % 2, captions_array(["a", "b"] * 16)))
    generator = load_generator(student, autoencoder=vae)
    decoder = one_step_decoding.untrained_small_decoder(generator, load_params(REPO / "params.yaml"))
    save_small_decoder(tmp_path / "models" / "decoder", decoder,
                       {"autoencoder_sha256": autoencoder_hash(vae), "latent_shape": [4, 4, 4],
                        "image_shape": [1, 8, 8]}, ldm / "latent_stats.json")
    return tmp_path


def test_evaluate_costs_compares_each_route_with_the_one_it_replaced(tmp_path):
    section = evaluate_costs.run("quick", tmp_path)  # no models there: the metric cases only
    assert [row[0] for row in section["rows"]] == [what for what, _, _ in evaluate_costs.METRIC_PAIRS]
    assert all(row[4] == "True" for row in section["rows"])  # the same KID, FD and precision/recall either way
    assert all(value > 0 for value in section["ratios"].values()) and len(section["ratios"]) == 3
    assert section["n"] == evaluate_costs.SIZES["quick"]["rounds"]
    assert all(len(rounds) == section["n"] for rounds in section["samples"].values())
    assert any(note.startswith("AR cache case not run") for note in section["notes"])


def test_evaluate_costs_times_batch_sizes_of_a_projects_teacher(project):
    section = evaluate_costs.run("quick", project)
    batches = evaluate_costs.SIZES["quick"]["batches"]
    compared = [row for row in section["rows"] if row[0].endswith(f"batch {batches[1]} vs {batches[0]}")]
    assert [row[0].split(",")[0] for row in compared] == ["teacher", "EffNet-Lite0 features", "autoencoder decoding",
                                                         "autoencoder encoding"]
    assert all(row[1] > 0 and row[2] > 0 and row[4] == "-" for row in compared)
    assert not any(note.startswith("batch-size cases not run") for note in section["notes"])


def test_one_step_decoding_without_a_project_times_random_networks_of_the_demos_shapes():
    section = one_step_decoding.run("quick", None)
    speeds = {row[0]: row for row in section["rows"]}
    assert list(speeds) == list(one_step_decoding.CASES.values())
    quick = one_step_decoding.SIZES["quick"]
    assert speeds["guided teacher + autoencoder decoder"][1] == quick["teacher_images"]
    assert speeds["1-step student + small decoder"][1] == quick["images"]
    # One network evaluation against 100 (50 guided steps): the student is faster end to end, whatever the load.
    assert section["ratios"]["student + small decoder / teacher + autoencoder decoder"] > 1
    assert all(row[4] is None for row in section["rows"]) and section["targets"] == {}  # untrained: no FD
    assert any("randomly initialised 'tiny' DiT" in note for note in section["notes"])


def test_one_step_decoding_uses_a_projects_models_decoder_and_test_images(project):
    section = one_step_decoding.run("quick", project)
    rows = {row[0]: row for row in section["rows"]}
    fd_full, fd_small = rows["1-step student + autoencoder decoder"][4], rows["1-step student + small decoder"][4]
    assert fd_full > 0 and fd_small > 0 and rows["guided teacher + small decoder"][4] is None
    assert section["ratios"]["FD small decoder / FD autoencoder decoder (same latents)"] == pytest.approx(
        fd_small / fd_full)
    assert list(section["targets"]) == ["FD small / FD autoencoder decoder <= 1.05"]
    assert any(f"small decoder {project / 'models' / 'decoder'}" in note for note in section["notes"])
    assert any("'guidance': 1.0" in note for note in section["notes"])  # the student's folded w
    json.dumps(section)  # what bench.json holds


@pytest.mark.parametrize("precision", ["bf16", "fp32", None])
def test_sampling_loads_a_projects_models_at_its_evaluate_precision(project, precision):
    """ROOT/params.yaml's ``evaluate.precision`` (this checkout's, bf16, says otherwise), or without that file the
    checkout's."""
    import yaml

    from gmpipe.config.params import load_params
    from tests.conftest import REPO

    if precision is not None:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["evaluate"]["precision"] = precision
        (project / "params.yaml").write_text(yaml.safe_dump(params))
    from gmpipe.precision import resolve_precision

    expected = resolve_precision(precision or load_params(REPO / "params.yaml").evaluate.precision, "cpu", "precision")
    teacher, students, notes = sampling.load_models(project, "tiny")
    assert [teacher.precision] + [s.precision for s in students.values()] == [expected] * 2, notes
    source = project / "params.yaml" if precision is not None else REPO / "params.yaml"
    assert f"generating at {expected} (evaluate.precision of {source})" in notes[0]
