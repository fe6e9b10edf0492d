"""The Generator interface on a small real latent diffusion model (untrained weights, a real autoencoder): a model
folder says its family, sample i depends only on seeds[i] and requests[i] (not on the batch size, the batch it is
in, or how a set is split between processes), and one sample is the image the per-batch path of before gave."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gmpipe.artifacts import ArtifactError
from gmpipe.data.latents import LatentStats
from gmpipe.diffusion import make_guided_model_fn
from gmpipe.errors import GmpipeError
from gmpipe.family_file import find_model_folders
from gmpipe.generator import FAMILY_FILE, Generated, Generator, load_generator
from gmpipe.latent_diffusion import LatentDiffusion
from gmpipe.pixels import signed_to_uint8
from gmpipe.registry import MODEL_FAMILIES, SAMPLERS
from gmpipe.seeds import SampleNoise
from tests.conftest import autocast_seen
from tests.hostile import write_model_folders

REQUESTS = [0, 1, 1, 0, 1, 0, 0]
SEEDS = [11, 3, 5, 8, 13, 21, 2**40]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> LatentDiffusion:
    ldm, vae = write_model_folders(tmp_path_factory.mktemp("generator"))
    return load_generator(ldm, autoencoder=vae)


def test_a_model_folder_says_its_family(model, tmp_path):
    assert isinstance(model, Generator) and type(model) is MODEL_FAMILIES["latent_diffusion"]
    model.save(tmp_path / "copy", "train_ldm")
    assert json.loads((tmp_path / "copy" / FAMILY_FILE).read_text()) == {"family": "latent_diffusion",
                                                                         "stage": "train_ldm"}
    (tmp_path / "copy" / FAMILY_FILE).write_text(json.dumps({"family": "normalizing_flow", "stage": "train_flow"}))
    with pytest.raises(ArtifactError, match="unknown model family 'normalizing_flow'.*rerun the 'train_flow' stage"):
        load_generator(tmp_path / "copy")
    with pytest.raises(ArtifactError, match="no trained model here.*run the 'distill' stage first"):
        load_generator(tmp_path, missing_stage="distill")


def test_every_draw_of_a_sample_comes_from_its_own_seed():
    """Row i of every draw is stream i's, whatever the other rows: a batch, its parts, and a reordering agree
    exactly, and a stream continues where it left off (the sampler's later draws)."""
    noise, again = SampleNoise(SEEDS), SampleNoise(SEEDS[::-1])
    first, second = noise.randn((len(SEEDS), 4, 2, 2)), noise.rand((len(SEEDS), 3))
    torch.testing.assert_close(again.randn((len(SEEDS), 4, 2, 2)), first.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(again.rand((len(SEEDS), 3)), second.flip(0), rtol=0, atol=0)
    alone = SampleNoise(SEEDS[2:3])
    torch.testing.assert_close(alone.randn((1, 4, 2, 2))[0], first[2], rtol=0, atol=0)
    part = SampleNoise(SEEDS).take(2, 4)
    torch.testing.assert_close(part.randn((2, 4, 2, 2)), first[2:4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs 7 rows, one per sample"):
        noise.randn((3, 4))


@pytest.mark.parametrize("sampler", SAMPLERS.names)
def test_a_sample_depends_only_on_its_seed_and_request(model, sampler):
    """The same set in one batch, in batches of 2 (a split across processes is the same: other batches), each sample
    alone, and in reverse order give the same samples, with every sampler (ddpm and consistency draw fresh noise
    every step). Equal up to float rounding: the network's kernels may sum in another order for another batch
    size (about 1e-6 here), so an image may differ by one level in a pixel that sits on a rounding boundary."""
    settings = {**model.settings, "sampler": sampler, "steps": 3}

    def latents(requests, seeds):
        return model.sample_latents(model.conditioning.encode(requests), SampleNoise(seeds), **settings)[0]

    whole = latents(REQUESTS, SEEDS)
    alone = torch.cat([latents([r], [s]) for r, s in zip(REQUESTS, SEEDS, strict=True)])
    torch.testing.assert_close(alone, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(latents(REQUESTS[::-1], SEEDS[::-1]).flip(0), whole, rtol=0, atol=1e-5)
    assert not torch.allclose(latents(REQUESTS, [seed + 1 for seed in SEEDS]), whole, atol=1e-2)

    images = model.generate(REQUESTS, SEEDS, batch_size=len(SEEDS), sampler=sampler, steps=3)
    assert isinstance(images, Generated) and images.images.dtype == np.uint8
    assert images.images.shape == (len(SEEDS), 1, 8, 8)
    in_pairs = model.generate(REQUESTS, SEEDS, batch_size=2, sampler=sampler, steps=3)
    difference = np.abs(in_pairs.images.astype(int) - images.images.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99
    assert in_pairs.nfe == images.nfe


def test_one_sample_is_the_image_of_the_per_batch_path(model):
    """For a single sample with seed s, the image the former path gave (noise from one generator seeded with s for
    the batch, the sampler, the decoder) is exactly the image generate gives now."""
    seed, label, steps, w = 7, 1, 4, 1.0
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *model.latent_shape), generator=generator)
    cond = torch.tensor([label])
    model_fn = make_guided_model_fn(lambda x, t, c: model.denoiser(x, t, c), cond,
                                    model.denoiser.null_condition(1, like=cond), w)
    with torch.no_grad():
        latents, nfe = SAMPLERS["euler"](model_fn, model.objective, noise, steps, shift=1.0, generator=generator)
        before = signed_to_uint8(model.decode(latents))
    now = model.generate([label], [seed], sampler="euler", steps=steps, guidance=w)
    np.testing.assert_array_equal(now.images, before)
    assert now.nfe == nfe == 2 * steps


def test_settings_are_the_models_own_unless_given(model):
    assert model.settings == {"sampler": "euler", "steps": 3, "guidance": 1.0, "shift": 1.0}
    default = model.generate([0], [1])
    np.testing.assert_array_equal(default.images, model.generate([0], [1], steps=3, guidance=1.0).images)
    assert default.nfe == 6  # 3 guided steps
    with pytest.raises(GmpipeError, match="this model has no setting 'temperature'"):
        model.generate([0], [1], temperature=0.7)
    with pytest.raises(ValueError, match="2 requests but 1 seeds"):
        model.generate([0, 1], [1])


def test_bf16_precision_runs_the_networks_under_autocast_and_keeps_the_images(tmp_path):
    """precision "bf16": the denoiser and the decoder run under bfloat16 autocast, the images are uint8 within a
    few levels of float32's, and the same seed still gives the same image; float32 runs no network in autocast.
    An unknown precision is one clear error."""
    ldm, vae = write_model_folders(tmp_path)
    exact, half = load_generator(ldm, autoencoder=vae), load_generator(ldm, autoencoder=vae, precision="bf16")
    assert (exact.precision, half.precision) == ("fp32", "bf16")
    seen_exact = autocast_seen(exact.denoiser, exact.autoencoder.decoder)
    seen_half = autocast_seen(half.denoiser, half.autoencoder.decoder)
    reference = exact.generate(REQUESTS, SEEDS, steps=4).images
    images = half.generate(REQUESTS, SEEDS, steps=4).images
    assert seen_exact and not any(seen_exact)
    assert seen_half and all(seen_half)
    assert images.dtype == np.uint8 and images.shape == reference.shape
    assert np.abs(images.astype(int) - reference.astype(int)).mean() < 3.0
    np.testing.assert_array_equal(half.generate(REQUESTS[:2], SEEDS[:2], steps=4).images, images[:2])
    with pytest.raises(GmpipeError, match="precision 'fp16': choose one of auto, fp32, bf16"):
        load_generator(ldm, autoencoder=vae, precision="fp16")


def test_auto_precision_is_what_the_generators_device_computes(tmp_path, monkeypatch):
    ldm, vae = write_model_folders(tmp_path)
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("gmpipe.precision.fast_bf16", lambda device, fast=fast: fast)
        assert load_generator(ldm, autoencoder=vae, precision="auto").precision == expected



def test_evaluates_bf16_on_an_emulating_cpu_warns_once_naming_its_key(tmp_path, monkeypatch, capsys):
    """evaluate resolves evaluate.precision when it starts (one warning line) and loads every model with the
    resolved value under the same key, so loading the teacher and the students adds no second, misnamed line."""
    from gmpipe import precision
    from gmpipe.config.evaluate import EvaluateConfig
    from gmpipe.paths import Paths
    from gmpipe.stages import evaluate

    ldm, vae = write_model_folders(tmp_path)
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    config = EvaluateConfig(precision="bf16")
    config = config.replace(precision=precision.resolve_precision(config.precision, "cpu", "evaluate.precision"))
    paths = Paths(tmp_path)
    assert paths.vae == vae
    loaded = [evaluate._load(config, paths, ldm, torch.device("cpu")) for _ in range(2)]
    assert [generator.precision for generator in loaded] == ["bf16", "bf16"]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.precision: bf16 runs emulated here"), lines

def test_model_folders_are_found_by_their_family_file(tmp_path):
    """models/NAME and models/GROUP/NAME with a family.json are model folders; anything else, or hidden (an
    interrupted atomic write), is not."""
    for folder in ("ldm", "vae", "student/reflow", "student/consistency", ".ldm.tmp-host-1-ab", "student/.x.old-1",
                   "student/plain/deeper"):
        (tmp_path / "models" / folder).mkdir(parents=True)
        (tmp_path / "models" / folder / FAMILY_FILE).write_text("{}")
    (tmp_path / "models" / "notes").mkdir()
    found = find_model_folders(tmp_path / "models")
    assert [f.relative_to(tmp_path / "models").as_posix() for f in found] == [
        "ldm", "student/consistency", "student/reflow", "vae"]
    assert find_model_folders(tmp_path / "nothing") == []


def test_the_ode_likelihood_depends_only_on_each_items_seed_and_reports_raw_latents(model, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    whole = model.likelihood(images, [0, 1, 0], [4, 5, 2**40], batch_size=2)
    alone = [model.likelihood(images[i : i + 1], [request], [seed]).bits
             for i, (request, seed) in enumerate(zip([0, 1, 0], [4, 5, 2**40], strict=True))]
    assert whole.bits == pytest.approx(np.mean(alone), rel=1e-5)
    assert (whole.n, whole.unit, whole.kind) == (3, "bits/dim", "estimate") and whole.standard_error > 0
    assert whole.parts["raw_latent_bits_per_dim"] == pytest.approx(whole.bits)  # scale 1: the same space
    # normalized = 2 z: log p(z) = log p(normalized) + D log 2, one bit per dimension less in raw latents
    monkeypatch.setattr(model, "stats", LatentStats((0.0,) * 4, (2.0,) * 4))
    scaled = model.likelihood(images, [0, 1, 0], [4, 5, 2**40])
    assert scaled.parts["raw_latent_bits_per_dim"] == pytest.approx(scaled.bits - 1.0)
