"""Reruns you can trust, through `dvc repro` in a scratch project: a changed setting or upstream artifact never
returns the old model, raising `steps` continues, lowering it starts over, and a run killed after its last checkpoint
finishes."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import run, smoke_params

PARAMS = {
    "prepare": {"max_per_class": 20},
    "train_vae": {"steps": 10, "checkpoint_every": 5, "disc_start": 5, "eval_images": 40, "perceptual_weight": 0.0},
    "train_ldm": {"steps": 10, "checkpoint_every": 5, "grid_per_class": 1},
    "train_ar": {"steps": 6, "checkpoint_every": 3, "grid_per_class": 1, "nll_items": 10},
    "train_gan": {"steps": 6, "checkpoint_every": 3, "grid_per_class": 1, "ppl_pairs": 2},
    "train_decoder": {"steps": 4, "checkpoint_every": 2, "eval_images": 10},
}


def _set(root, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _repro(root, stage: str) -> str:
    result = run(["dvc", "repro", stage], root)
    return result.stdout + result.stderr


def _weights(folder) -> dict:
    return load_file(next(folder.rglob("*.safetensors")))


@pytest.mark.slow
def test_reruns_do_what_dvc_says(prefect_api, dvc_project):
    root = dvc_project(smoke_params(**PARAMS))
    _repro(root, "train_vae")

    # The state a kill leaves once `checkpoints/train_vae/step-<final>` exists but before the outputs are
    # written: DVC already removed the stage's outputs, and the rerun resumes with no step left to train.
    plots = root / "reports/train_vae/live/plots/metrics"
    rows_before = sorted(p.read_text() for p in plots.rglob("*.tsv"))
    for output in ("models/vae", "reports/train_vae"):
        shutil.rmtree(root / output)
    log = _repro(root, "train_vae")
    assert "resuming from" in log and "(step 10)" in log, log
    for output in ("models/vae/config.json", "reports/train_vae/metrics.json",
                   "reports/train_vae/reconstructions.png"):
        assert (root / output).is_file(), output
    # The loss curves are complete again: rebuilt from the history stored in the checkpoint.
    assert sorted(p.read_text() for p in plots.rglob("*.tsv")) == rows_before
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train_vae"], root).stdout

    _repro(root, "train_ldm")
    vae_before = _weights(root / "models/vae")

    # A model/objective key: train_ldm starts over and its objective.json matches the weights it ships.
    _set(root, "train_ldm", schedule="vp_cosine")
    log = _repro(root, "train_ldm")
    assert "train_ldm: starting over: train_ldm.schedule changed (\"rectified_flow\" -> \"vp_cosine\")" in log, log
    assert json.loads((root / "models/ldm/objective.json").read_text())["schedule"]["name"] == "vp_cosine"
    assert (root / "checkpoints/train_ldm.stale").is_dir()

    # Raising steps continues the same run.
    _set(root, "train_ldm", steps=15)
    log = _repro(root, "train_ldm")
    assert "train_ldm: resuming from" in log and "(step 10)" in log, log
    assert json.loads((root / "reports/train_ldm/metrics.json").read_text())["step"] == 15

    # Lowering steps never returns the longer-trained model: the run starts over and trains that many.
    _set(root, "train_ldm", steps=12)
    log = _repro(root, "train_ldm")
    assert "train_ldm: starting over: steps is 12, fewer than the 15" in log, log
    assert json.loads((root / "reports/train_ldm/metrics.json").read_text())["step"] == 12

    # A new learning rate retrains the autoencoder from scratch; the denoiser, whose latents changed, too.
    _set(root, "train_vae", lr=0.002)
    log = _repro(root, "train_ldm")
    assert "train_vae: starting over: train_vae.lr changed (0.001 -> 0.002)" in log, log
    assert "train_ldm: starting over: data/latents changed" in log, log
    vae_after = _weights(root / "models/vae")
    assert any(not (vae_before[k] == vae_after[k]).all() for k in vae_before)
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train_ldm"], root).stdout

    # The other families are stages of the same graph, on the same latents.
    log = run(["dvc", "repro", "train_ar", "train_gan"], root)
    assert "Running stage 'train_ar'" in log.stdout and "Running stage 'train_gan'" in log.stdout
    for family, folder in (("autoregressive", "models/ar"), ("latent_gan", "models/gan")):
        assert json.loads((root / folder / "family.json").read_text())["family"] == family
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train_ar", "train_gan"], root).stdout

    # The small decoder is distilled from the same autoencoder on the same latents.
    log = _repro(root, "train_decoder")
    assert "Running stage 'train_decoder'" in log and (root / "models/decoder/config.json").is_file(), log
    info = json.loads((root / "models/decoder/decoder.json").read_text())
    assert info["latent_shape"] == [4, 8, 8] and info["steps"] == 4
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train_decoder"], root).stdout
