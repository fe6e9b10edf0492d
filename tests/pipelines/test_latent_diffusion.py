"""A gmpipe model folder is a diffusers pipeline folder: diffusers loads it offline through DiffusionPipeline (the
class resolved from the folder, no hub, no network) and draws exactly gmpipe sample's images for the same seeds;
gmpipe's pipeline class loads it without trust_remote_code (and refuses a changed resolver), saves it back as a
gmpipe model folder, and samples unconditional models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmpipe.cli import main
from gmpipe.generator import load_generator
from gmpipe.pipelines.latent_diffusion import LatentDiffusionPipeline, save_pipeline_files
from gmpipe.pipelines.scheduler import LatentDiffusionScheduler
from tests.hostile import write_model_folders

REPO = Path(__file__).resolve().parents[2]
LABELS, SEED, STEPS, W = [0, 0, 1, 1], 5, 3, 1.5  # gmpipe sample --classes 0 1 -n 2 --seed 5: seeds 5..8
SEEDS = [SEED + i for i in range(len(LABELS))]

# Run in a fresh process: no network at all (any connection but to loopback raises), the hub offline, an empty
# HF_HOME; diffusers must resolve the pipeline class from the folder's pipeline.py.
OFFLINE_SCRIPT = r"""
import json, socket, sys
import numpy as np, torch

def refuse(*args, **kwargs):
    raise OSError("network access attempted")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
from diffusers import DiffusionPipeline

folder, out, labels, seeds, steps, scale = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:7])
try:
    DiffusionPipeline.from_pretrained(folder)
    refused = ""
except ValueError as exc:
    refused = str(exc)
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
generators = lambda: [torch.Generator().manual_seed(s) for s in seeds]
result = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=scale, generator=generators())
scheduler = type(pipe.scheduler)
pipe.scheduler = scheduler.from_config(pipe.scheduler.config, sampler="dpmpp_2m")
solver = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=scale, generator=generators())
np.savez(out, images=np.stack([np.array(image) for image in result.images]), nfe=result.nfe,
         solver=np.stack([np.array(image) for image in solver.images]), solver_nfe=solver.nfe)
print(json.dumps({"pipeline": type(pipe).__module__ + "." + type(pipe).__name__, "refused": refused}))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(models/ldm, models/vae) of a small untrained class-conditional model, models/ldm a pipeline folder too."""
    ldm, vae = write_model_folders(tmp_path_factory.mktemp("pipeline"))
    save_pipeline_files(ldm, load_generator(ldm), "train_ldm", autoencoder=vae)
    return ldm, vae


def _gmpipe_sample(ldm: Path, vae: Path, out: Path, *extra: str) -> np.ndarray:
    assert main(["sample", "--model", str(ldm), "--vae", str(vae), "--classes", "0", "1", "-n", "2", "--seed",
                 str(SEED), "--steps", str(STEPS), "--guidance", str(W), "--device", "cpu", "--out", str(out),
                 *extra]) == 0
    with np.load(out) as saved:
        return saved["images"][:, 0]  # (N, H, W): 1-channel images, as the PIL images are


def test_diffusers_loads_the_folder_offline_and_draws_gmpipe_samples(folders, tmp_path):
    ldm, vae = folders
    index = json.loads((ldm / "model_index.json").read_text())
    assert index["denoiser"] == ["diffusers", "DiTTransformer2DModel"] and index["vae"] == ["diffusers",
                                                                                            "AutoencoderKL"]
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # the autoencoder, byte for byte
        assert (ldm / "vae" / name).read_bytes() == (vae / name).read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1")
    out = tmp_path / "pipeline.npz"
    result = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(ldm), str(out), json.dumps(LABELS),
                             json.dumps(SEEDS), str(STEPS), str(1 + W)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pipeline"] == "gmpipe.pipelines.latent_diffusion.LatentDiffusionPipeline"
    assert "trust_remote_code=True" in report["refused"]  # diffusers runs no code from a folder unless asked

    with np.load(out) as drawn:
        assert int(drawn["nfe"]) == int(drawn["solver_nfe"]) == 2 * STEPS  # guided: two evaluations per step
        np.testing.assert_array_equal(drawn["images"], _gmpipe_sample(ldm, vae, tmp_path / "gmpipe.npz"))
        np.testing.assert_array_equal(drawn["solver"], _gmpipe_sample(ldm, vae, tmp_path / "solver.npz",
                                                                      "--sampler", "dpmpp_2m"))


def test_the_pipeline_class_loads_without_remote_code_and_saves_a_gmpipe_folder(folders, tmp_path):
    ldm, vae = folders
    (ldm / "pipeline.py").write_text((ldm / "pipeline.py").read_text() + "raise SystemExit('ran folder code')\n")
    try:
        with pytest.raises(ValueError, match="trust_remote_code"):
            LatentDiffusionPipeline.from_pretrained(ldm)  # a changed resolver is foreign code: refused
    finally:
        (ldm / "pipeline.py").write_text((ldm / "pipeline.py").read_text().rsplit("raise", 1)[0])
    pipe = LatentDiffusionPipeline.from_pretrained(ldm)
    assert isinstance(pipe.scheduler, LatentDiffusionScheduler) and pipe.get_label_ids(["b", "a"]) == [1, 0]
    attentions = [a for a in pipe.vae.decoder.mid_block.attentions if a is not None]
    assert attentions and all(len(a._forward_hooks) == 1 for a in attentions)  # diffusers' loading gets the layout fix
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    as_numbers = pipe(class_labels=LABELS, guidance_scale=1 + W, num_inference_steps=STEPS, generator=generators,
                      output_type="np")
    expected = load_generator(ldm, autoencoder=vae).generate(LABELS, SEEDS, steps=STEPS, guidance=W)
    np.testing.assert_array_equal((as_numbers.images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2),
                                  expected.images)
    # defaults are the model's own (sampling.json: 3 Euler steps, w = 1); one generator feeds the images in turn
    default = pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert default.nfe == 6 and default.images.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=[0, 1], generator=[torch.Generator()])
    with pytest.raises(ValueError, match="not both"):
        pipe(class_labels=[0], prompt="a photo of a b")

    pipe.save_pretrained(tmp_path / "saved")  # a gmpipe model folder, and a pipeline folder again
    again = load_generator(tmp_path / "saved", autoencoder=tmp_path / "saved" / "vae")
    np.testing.assert_array_equal(again.generate(LABELS, SEEDS, steps=STEPS, guidance=W).images, expected.images)
    reloaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.scheduler.config == pipe.scheduler.config
    assert reloaded.config.conditioning == pipe.config.conditioning


def test_an_unconditional_model_samples_a_batch(tmp_path):
    ldm, vae = write_model_folders(tmp_path, mode="none")
    model = load_generator(ldm, autoencoder=vae)
    save_pipeline_files(ldm, model, "train_ldm", autoencoder=vae)
    pipe = LatentDiffusionPipeline.from_pretrained(ldm)
    result = pipe(batch_size=3, generator=[torch.Generator().manual_seed(seed) for seed in (7, 8, 9)])
    assert result.nfe == 3  # no guidance pass for an unconditional model
    np.testing.assert_array_equal(np.stack([np.array(image) for image in result.images]),
                                  model.generate(None, [7, 8, 9]).images[:, 0])
    with pytest.raises(ValueError, match="batch_size"):
        pipe()
