"""cache_latents and train_ldm on the fixture: the cache reproduces the VAE posterior, training lowers the loss,
every output is written, and `gmpipe sample` loads the result."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from gmpipe.cli import main
from gmpipe.conditioning import ClassLabels, Conditioning
from gmpipe.config.params import parse_params
from gmpipe.data.latents import STATS, LatentStats, load_split, load_texts
from gmpipe.data.prepared import load_manifest
from gmpipe.data.prepared import load_split as load_prepared
from gmpipe.errors import GmpipeError
from gmpipe.eval import training_curves
from gmpipe.generator import Generator, load_generator, write_family
from gmpipe.nn.autoencoder import load_autoencoder
from gmpipe.paths import Paths
from gmpipe.pipelines.latent_diffusion import LatentDiffusionPipeline
from gmpipe.seeds import SampleNoise
from gmpipe.stages import cache_latents, distill, evaluate, prepare, train_decoder, train_ldm, train_vae
from tests.browser import open_page
from tests.conftest import REPO, run, smoke_params


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """Prepared fixture data and a smoke-trained autoencoder, shared by the tests in this module."""
    root = tmp_path_factory.mktemp("latents")
    params = parse_params(smoke_params(prepare={"max_per_class": 20}, train_vae={"steps": 10, "disc_start": 5}))
    paths = Paths(root)
    prepare.run(params.data, params.prepare, paths)
    train_vae.run(params.data, params.train_vae, params.compute, paths)
    cache_latents.run(params.cache_latents, params.compute.device, params.compute.threads, paths)
    return params, paths


def test_cache_reproduces_the_vae_posterior(trained_vae):
    params, paths = trained_vae
    vae = load_autoencoder(paths.vae)
    images = load_prepared(paths.prepared, "val").images
    cached = load_split(paths.latents, "val")
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(images).float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(cached.mean, posterior.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.std, posterior.std, rtol=1e-5, atol=1e-5)
    assert cached.labels.tolist() == load_prepared(paths.prepared, "val").labels.tolist()


def test_bf16_cache_is_the_posterior_within_bfloat16_rounding(trained_vae, tmp_path):
    params, paths = trained_vae
    bf16 = params.cache_latents.model_copy(update={"precision": "bf16"})
    for name in ("data/prepared", "models/vae"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(paths.root / name)
    cache_latents.run(bf16, params.compute.device, params.compute.threads, Paths(tmp_path))
    exact, rounded = load_split(paths.latents, "val"), load_split(tmp_path / "data/latents", "val")
    assert rounded.mean.dtype == torch.float32
    assert not torch.equal(rounded.mean, exact.mean)  # the encoder did run in bfloat16
    error = (rounded.mean - exact.mean).abs().mean() / exact.mean.std()
    assert error < 0.02, error
    # stats.json names the precision the encoder ran at (auto: what it resolved to on this machine)
    assert json.loads((tmp_path / "data/latents" / STATS).read_text())["encoder_precision"] == "bf16"
    assert json.loads((paths.latents / STATS).read_text())["encoder_precision"] == "fp32"



@pytest.fixture
def threads_restored():
    """The stages set torch's threads for the process (``compute.threads``); put the test process's back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cache_latents_computes_on_compute_threads(trained_vae, tmp_path, threads_restored):
    """`compute.threads: 1` (the setting for a shared, busy CPU) reaches cache_latents as it does the training
    stages."""
    params, paths = trained_vae
    for name in ("data/prepared", "models/vae"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(paths.root / name)
    torch.set_num_threads(2)
    cache_latents.run(params.cache_latents, "cpu", 1, Paths(tmp_path))
    assert torch.get_num_threads() == 1
    written = sorted(path.name for path in (tmp_path / "data/latents").iterdir())
    assert written == sorted(path.name for path in paths.latents.iterdir())


def test_the_same_inputs_cache_to_the_same_bytes_whatever_ran_before(trained_vae, tmp_path):
    """DVC hashes data/latents: the same prepared data and autoencoder write the same files, however the process's
    global RNG was used before (a fresh `gmpipe stage` or one forked by the stage server), so a forced rerun does not
    make every later stage start over with `data/latents changed`."""
    params, paths = trained_vae
    for name in ("data/prepared", "models/vae"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(paths.root / name)
    torch.manual_seed(12345)
    torch.rand(1000)
    cache_latents.run(params.cache_latents, params.compute.device, params.compute.threads, Paths(tmp_path))
    first = sorted(path.name for path in paths.latents.iterdir())
    assert sorted(path.name for path in (tmp_path / "data/latents").iterdir()) == first
    for name in first:
        assert (tmp_path / "data/latents" / name).read_bytes() == (paths.latents / name).read_bytes(), name

def test_stats_normalize_latents(trained_vae):
    _, paths = trained_vae
    stats = LatentStats.load(paths.latents / STATS)
    train = load_split(paths.latents, "train")
    normalized = stats.normalize(train.sample(torch.arange(len(train)), torch.Generator().manual_seed(1)))
    channel_mean = normalized.mean(dim=(0, 2, 3))
    channel_std = normalized.std(dim=(0, 2, 3))
    assert channel_mean.abs().max() < 0.1 and (channel_std - 1).abs().max() < 0.1
    torch.testing.assert_close(stats.denormalize(stats.normalize(train.mean)), train.mean, rtol=1e-4, atol=1e-4)
    assert json.loads((paths.latents / STATS).read_text())["measured_on"] == "train"


def test_text_embeddings_are_cached(trained_vae):
    _, paths = trained_vae
    captions, states, mask = load_texts(paths.latents)
    assert len(captions) == 10 and states.shape[:2] == (10, 16) and states.shape[2] == 384
    assert mask[:, 0].all() and not mask.all()
    train = load_split(paths.latents, "train")
    assert captions[int(train.caption_index[0])].startswith("a photo of a ")


@pytest.fixture(scope="module")
def trained_ldm(trained_vae):
    params, paths = trained_vae
    config = params.train_ldm.replace(steps=40, log_every=10, checkpoint_every=20)
    return params, paths, train_ldm.run(config, params.compute, paths)


def test_train_ldm_smoke_and_sample(trained_ldm, tmp_path):
    params, paths, summary = trained_ldm
    assert summary["steps"] == 40 and summary["final_loss"] < summary["first_loss"]
    for name in ("family.json", "denoiser", "denoiser_raw", "objective.json", "sampling.json", "conditioning.json",
                 "latent_stats.json", "training.json"):
        assert (paths.ldm / name).exists(), name
    assert (paths.reports / "train_ldm/samples.png").is_file()
    _assert_pipeline_folder(paths.ldm, paths.vae)
    objective = json.loads((paths.ldm / "objective.json").read_text())
    assert objective["schedule"]["name"] == "rectified_flow" and objective["target"]["name"] == "velocity"

    generator = load_generator(paths.ldm, autoencoder=paths.vae)
    images, nfe = generator.generate([0, 1, 2], seeds=[0, 1, 2], steps=3, guidance=1.0)
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8 and nfe == 6  # guided: 2 per step
    settings = {**generator.settings, "steps": 3}
    latents, _ = generator.sample_latents(generator.conditioning.encode([0, 1, 2]), SampleNoise([0, 1, 2]), **settings)
    assert latents.shape == (3, 4, 8, 8)
    with pytest.raises(GmpipeError, match="out of range"):
        generator.generate([99], seeds=[0])

    out = tmp_path / "grid.npz"
    code = main(["sample", "--model", str(paths.ldm), "--vae", str(paths.vae), "--classes", "3", "7", "-n", "2",
                 "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    with np.load(out) as saved:
        assert saved["images"].shape == (4, 1, 32, 32) and saved["labels"].tolist() == [3, 3, 7, 7]


@pytest.mark.parametrize("kind", ["text", "none"])
def test_every_conditioning_trains_and_generates(trained_vae, tmp_path, kind):
    """A text-conditional and an unconditional denoiser train, save their conditioning, and generate through the
    same interface and command as the class-conditional one (class labels become class captions for text)."""
    params, shared = trained_vae
    paths = _copy_project(shared, tmp_path)
    config = params.train_ldm.replace(conditioning=kind, steps=2, warmup_steps=0, grid_per_class=1)
    summary = train_ldm.run(config, params.compute, paths)
    assert summary["grid_nfe"] == config.sample_steps * (1 if kind == "none" else 2)
    generator = load_generator(paths.ldm, autoencoder=paths.vae)
    assert generator.conditioning.kind == kind and type(generator.denoiser).mode == kind
    images, nfe = generator.generate([0, 1], seeds=[0, 1], steps=2)
    assert images.shape == (2, 1, 32, 32) and nfe == (2 if kind == "none" else 4)
    out = tmp_path / "samples.npz"
    prompts = ["--prompts", "a photo of a bag"] if kind == "text" else []
    assert main(["sample", "--model", str(paths.ldm), "--vae", str(paths.vae), *prompts, "-n", "2", "--steps", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as saved:
        assert saved["images"].shape == (2, 1, 32, 32) and saved["labels"].tolist() == [-1, -1]
        saved_images = saved["images"]
    # the diffusers pipeline of the same folder draws the same images (text: prompts; unconditional: a batch)
    pipe = LatentDiffusionPipeline.from_pretrained(paths.ldm)
    asked = {"prompt": ["a photo of a bag", "a photo of a bag"]} if kind == "text" else {"batch_size": 2}
    drawn = pipe(**asked, num_inference_steps=1, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    np.testing.assert_array_equal(np.stack([np.array(image) for image in drawn.images]), saved_images[:, 0])


def _assert_pipeline_folder(folder, vae) -> None:
    """``folder`` is a diffusers pipeline folder too, with models/vae's autoencoder byte for byte."""
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LatentDiffusionPipeline"] and (folder / "pipeline.py").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (folder / "vae" / name).read_bytes() == (vae / name).read_bytes()


def test_missing_upstream_names_the_stage(tmp_path):
    params = parse_params(smoke_params())
    with pytest.raises(GmpipeError, match="train_vae"):
        cache_latents.run(params.cache_latents, params.compute.device, params.compute.threads, Paths(tmp_path))
    with pytest.raises(GmpipeError, match="run the .cache_latents. stage first"):
        train_ldm.run(params.train_ldm, params.compute, Paths(tmp_path))


@pytest.fixture(scope="module")
def distilled(trained_ldm):
    params, paths, _ = trained_ldm
    return params, paths, distill.run(params.distill, params.compute, paths)


def test_distill_writes_students_that_sample(distilled):
    params, paths, summary = distilled
    assert summary["students"] == ["progressive-4step", "progressive-2step", "progressive-1step", "reflow",
                                   "consistency"]
    for name in summary["students"]:
        info = json.loads((paths.student / name / "student.json").read_text())
        assert info["guidance_folded"] == 1.0 and info["nfe_per_step"] == 1
        generator = load_generator(paths.student / name, autoencoder=paths.vae)
        steps = info["steps"][0]
        images, nfe = generator.generate([1, 2], seeds=[0, 1], steps=steps)
        assert nfe == steps and images.shape == (2, 1, 32, 32)  # guidance folded in: 1 evaluation per step
        _assert_pipeline_folder(paths.student / name, paths.vae)
    reflow = json.loads((paths.student / "reflow" / "objective.json").read_text())
    assert reflow["schedule"]["name"] == "rectified_flow" and reflow["target"]["name"] == "velocity"
    table = json.loads((paths.reports / "distill/metrics.json").read_text())
    assert table["progressive-1step"]["steps"] == [1] and table["reflow"]["train_steps"] == params.distill.loop.steps
    assert "| reflow | reflow |" in summary["markdown"]
    # Rerunning resumes every student from its finished checkpoint instead of training again.
    again = distill.run(params.distill, params.compute, paths)
    assert again["students"] == summary["students"]


class NoiseImages(Generator):
    """A model family evaluate has never heard of (registered by the test only): class-conditional uniform noise,
    each image from its own seed."""

    def __init__(self, conditioning, shape) -> None:
        self.conditioning, self.shape, self.settings = conditioning, tuple(shape), {"level": 1.0}

    @classmethod
    def load(cls, folder, stage, *, autoencoder=None, device="cpu"):
        return cls(Conditioning.load(folder, stage), json.loads((folder / "shape.json").read_text()))

    def generate(self, requests, seeds, *, batch_size=256, **settings):
        self.conditioning.encode(self.requests_for(requests, seeds))  # checks the labels
        level = self.resolve_settings(settings)["level"]
        images = (SampleNoise(seeds).rand((len(seeds), *self.shape)) * 255 * level).to(torch.uint8).numpy()
        return images, 1


def add_noise_family(paths: Paths, monkeypatch) -> Path:
    """models/noise/: a model folder of the NoiseImages family, found by its family.json alone."""
    from gmpipe.registry import MODEL_FAMILIES

    monkeypatch.setitem(MODEL_FAMILIES._entries, "noise_images", f"{__name__}:NoiseImages")
    folder = paths.models / "noise"
    folder.mkdir(parents=True)
    (folder / "shape.json").write_text("[1, 32, 32]")
    ClassLabels(load_manifest(paths.prepared)["class_names"]).save(folder)
    write_family(folder, NoiseImages, "make_noise")
    return folder


@pytest.fixture(scope="module")
def evaluated(distilled, small_decoder):
    """evaluate on the smoke models and the small decoder, with a model folder of the test's own family beside
    them."""
    params, paths, _ = distilled
    with pytest.MonkeyPatch.context() as monkeypatch:
        noise = add_noise_family(paths, monkeypatch)
        try:
            summary = evaluate.run(params.evaluate, params.compute.device, params.compute.threads, paths)
        finally:
            shutil.rmtree(noise)  # the module's project is shared with the tests after this one
    return params, paths, summary


def test_evaluate_writes_metrics_plots_samples_and_report(evaluated):
    """Every model folder (found by family.json, the test's own family included) is measured and appears in the one
    family table, in metrics.json, the report and the summary."""
    params, paths, summary = evaluated
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    n = params.evaluate.n_samples
    assert metrics["teacher"]["n"] == n and str(n) in metrics["floor"]
    assert metrics["teacher"]["fd_effnet"] > 0 and 0 <= metrics["teacher"]["accuracy"] <= 1
    assert metrics["vae"]["n"] == n and "psnr" in metrics["vae"]
    assert metrics["notes"] == []
    assert metrics["machine"]["generation_precision"] == params.evaluate.precision == "fp32"
    assert metrics["students"]["progressive-1step_1step"]["nfe"] == 1
    assert metrics["students"]["reflow_2step"]["n"] == n
    out = paths.reports / "evaluate"
    sweep = (out / "plots/nfe_sweep.csv").read_text().splitlines()
    assert sweep[0].startswith("curve,model,sampler,steps,nfe") and sweep[0].endswith(",images_per_second")
    assert all(float(line.rsplit(",", 1)[1]) > 0 for line in sweep[1:])  # what bench.family_speed reads
    assert sum(line.startswith("teacher") for line in sweep) == 3 * 2  # samplers x steps of the smoke sweep
    assert len((out / "plots/guidance_sweep.csv").read_text().splitlines()) == 1 + 2
    assert set(metrics["teacher_by_w"]) >= {"w1"}  # the teacher at the students' folded w, at equal n
    assert metrics["students"]["reflow_1step"]["teacher_w"] == 1.0
    assert metrics["students"]["reflow_1step"]["fd_ratio_to_teacher"] > 0
    with np.load(out / f"samples/teacher_n{n}_w{metrics['teacher']['w']:g}.npz") as saved:
        assert saved["images"].shape == (n, 1, 32, 32) and saved["images"].dtype == np.uint8
        assert len(saved["labels"]) == n and str(saved["sampler"]) == "euler"
    # No set is generated twice: the guidance sweep's point at w = 1 is the first n of the headline set at w = 1 (sample
    # i has seed i in both), and the NFE sweep's euler point at the default steps is the guidance point at the chosen w.
    n_sweep = params.evaluate.sweep_samples
    with np.load(out / "samples/teacher_w1.npz") as swept, np.load(out / f"samples/teacher_n{n}_w1.npz") as headline:
        np.testing.assert_array_equal(swept["images"], headline["images"][:n_sweep])
        np.testing.assert_array_equal(swept["labels"], headline["labels"][:n_sweep])
    chosen = next(row for row in metrics["families"].values()
                  if row["model"] == "teacher" and row["n"] == n_sweep and row["sampler"] == "euler")
    with (out / "plots/guidance_sweep.csv").open() as handle:
        at_chosen_w = next(row for row in csv.DictReader(handle) if float(row["w"]) == chosen["guidance"])
    assert float(at_chosen_w["fd_effnet"]) == pytest.approx(chosen["fd_effnet"], rel=1e-12)
    html = (paths.reports / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64" in html and "http" not in html.replace("http://www.w3.org", "")
    assert "| teacher |" in summary["markdown"]

    # One family table: a row per model folder present (the teacher also per w and per sweep sampler).
    table = list(metrics["families"].values())
    folders = {"ldm": "teacher", "vae": "vae", "noise": "noise",
               **{f"student/{f.name}": f"student:{f.name}" for f in paths.student.iterdir()}}
    assert {row["model"] for row in table} == set(folders.values())
    assert {row["family"] for row in table} == {"latent_diffusion", "vae_prior", "noise_images"}
    sweep_samplers = {row["sampler"] for row in table if row["model"] == "teacher" and row["n"] == 40}
    assert sweep_samplers == set(params.evaluate.sweep_samplers) and "sde" in sweep_samplers
    for row in table:
        values = [row[c] for c in ("fd_effnet", "floor_fd_effnet", "fd_minus_floor", "kid", "precision", "recall",
                                   "images_per_second", "nfe")]
        assert all(math.isfinite(value) for value in values), row
        assert row["fd_effnet"] > 0 and row["images_per_second"] > 0 and 0 <= row["recall"] <= 1, row
        assert row["floor_fd_effnet"] == metrics["floor"][str(row["n"])]["fd_effnet"]
        assert (row["accuracy"] is not None) == (row["model"] != "vae")  # the VAE prior is unconditional
    likelihoods = metrics["likelihoods"]
    assert set(likelihoods) == {"teacher", "vae"}  # noise and the students define no density
    assert likelihoods["vae"]["kind"] == "upper bound" and likelihoods["teacher"]["kind"] == "estimate"
    assert all(math.isfinite(value["bits"]) and value["n"] == params.evaluate.likelihood_samples
               for value in likelihoods.values())
    assert metrics["models"]["noise"]["nfe"] == 1 and metrics["models"]["vae"]["nfe"] == 1
    assert metrics["targets"]["sde_vs_euler"]["measured"] is False  # the smoke sweep stops at NFE 8
    # One-step generation end to end: the best 1-step student's latents decoded by both decoders, at equal n.
    one_step = metrics["one_step_end_to_end"]
    best = min((r for r in metrics["students"].values() if r["nfe"] == 1), key=lambda r: r["fd_effnet"])
    assert one_step["student"] == best["model"].split(":")[1] and one_step["n"] == n and one_step["steps"] == 1
    assert one_step["fd_full_decoder"] == best["fd_effnet"] and one_step["fd_small_decoder"] > 0
    assert one_step["fd_ratio"] == pytest.approx(one_step["fd_small_decoder"] / one_step["fd_full_decoder"])
    speeds = one_step["images_per_second"]
    assert set(speeds) == {f"{m}_{d}_decoder" for m in ("teacher", "student") for d in ("full", "small")}
    assert all(value > 0 for value in speeds.values())
    assert one_step["speedup_vs_teacher"] == pytest.approx(speeds["student_small_decoder"] /
                                                           speeds["teacher_full_decoder"])
    assert one_step["timed_images"] == {"teacher": min(params.evaluate.batch_size, n), "student": n}
    assert one_step["teacher"]["guidance"] == 1.0  # the students' folded w, at the teacher's own sampler and steps
    assert one_step["teacher"]["steps"] == params.train_ldm.sample_steps
    assert isinstance(one_step["speedup_met"], bool) and isinstance(one_step["fd_met"], bool)
    with np.load(out / "samples" / one_step["samples"]) as saved:
        assert saved["images"].shape == (n, 1, 32, 32) and saved["images"].dtype == np.uint8
    assert "One-step generation end to end" in summary["markdown"] and "One-step generation end to end" in html
    for family in ("latent_diffusion", "vae_prior", "noise_images"):
        assert f"| {family} |" in summary["markdown"]
    assert "Test likelihoods" in summary["markdown"] and "Every model, one table" in html
    plotted = (out / "plots/families.csv").read_text().splitlines()
    assert plotted[0] == "curve,model,family,settings,nfe,n,fd_effnet,fd_minus_floor,images_per_second"
    assert {line.split(",")[1] for line in plotted[1:]} == set(folders.values())
    assert (out / "grids/noise.png").is_file() and (out / f"samples/vae_n{n}.npz").is_file()
    # Grids: one row per class, its name in a margin on the left (the unconditional VAE prior: 80 images, no names).
    labelled, plain = Image.open(out / "grids/teacher_w1.png"), Image.open(out / "grids/vae.png")
    per_class = n // 10
    assert labelled.height == 2 * (10 * (32 + 2) + 2) and labelled.width > 2 * (per_class * (32 + 2) + 2) + 40
    assert plain.size == (2 * (10 * 34 + 2), 2 * (-(-min(80, n) // 10) * 34 + 2))


def _git(root: Path, *args: str) -> str:
    return run(["git", *args], root).stdout


def test_report_renders_offline_in_chromium(evaluated, tmp_path):
    """The smoke report, written again after its metrics were committed (so it shows this run beside the committed
    one), opened once in headless Chromium: every image decoded, every plot drawn, no request left the machine."""
    params, paths, _ = evaluated
    _git(paths.root, "init", "-q")
    _git(paths.root, "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "add", "reports/metrics.json")
    _git(paths.root, "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "smoke run")
    commit = _git(paths.root, "rev-parse", "--short", "HEAD").strip()
    evaluate.write_report(paths, params.evaluate.n_samples)
    html = (paths.reports / "report.html").read_text()
    assert f"Beside the metrics committed in <code>{commit}</code>" in html
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch

    opened = open_page(paths.reports / "report.html", tmp_path / "chromium")
    images, svgs = opened.rendered["images"], opened.rendered["svgs"]
    grids = {g.stem for g in (paths.reports / "evaluate/grids").glob("*.png")}
    assert {image["alt"] for image in images} == grids | {"autoencoder reconstructions"}
    assert all(image["complete"] and image["width"] > 0 for image in images), images
    # Plots: the family and sweep NFE plots, the two guidance plots, one per loss term of each training stage.
    curves = sum(len(training_curves.read_curves(live)) for live in paths.reports.glob("*/live"))
    assert curves >= 8 and len(svgs) == 2 + 2 + curves
    assert all(svg["width"] > 200 and svg["height"] > 100 and svg["lines"] >= 1 for svg in svgs), svgs
    assert max(svg["lines"] for svg in svgs) >= 5  # the sweep: one line per sampler and student
    assert opened.net_events > 0 and opened.page_requests == []
    screenshot = Image.open(opened.screenshot)
    assert screenshot.size == (1280, 2400) and len(set(screenshot.convert("L").getdata())) > 50  # not blank


def test_dvc_plots_draw_one_line_per_curve(evaluated, tmp_path):
    """`dvc plots show --json` on the smoke run's reports, with this project's dvc.yaml and plot template: the NFE
    plots colour each curve (teacher sampler, student, model) apart, on a log2 axis."""
    params, paths, _ = evaluated
    root = tmp_path / "project"
    shutil.copytree(paths.reports, root / "reports", ignore=shutil.ignore_patterns("samples", "classifier"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    output = json.loads(run(["dvc", "plots", "show", "--json"], root).stdout)
    # Only the loss curves of the stages this module does not train are missing.
    assert {error["name"] for error in output.get("errors", [])} <= {
        f"reports/{stage}/live/plots/metrics" for stage in ("train_ar", "train_gan")}, output["errors"]
    shown = output["data"]
    students = {f"student:{folder.name}" for folder in paths.student.iterdir()}
    expected = {"reports/evaluate/plots/nfe_sweep.csv": {f"teacher {s}" for s in params.evaluate.sweep_samplers}
                | students,
                "reports/evaluate/plots/families.csv": {f"{row['model']} ({row['family']})" for row in
                                                        json.loads((paths.reports / "metrics.json").read_text())
                                                        ["families"].values()}}
    for file, curves in expected.items():
        (plot,) = shown[file]
        spec = plot["content"]
        assert spec["encoding"]["color"]["field"] == "curve" and spec["encoding"]["x"]["scale"]["type"] == "log"
        by_curve = {}
        for value in spec["data"]["values"]:
            by_curve.setdefault(value["curve"], []).append(float(value["nfe"]))
        assert set(by_curve) == curves, file
        if file.endswith("nfe_sweep.csv"):  # each curve a line through its step counts, not a zigzag
            assert all(len(points) == len(set(points)) for points in by_curve.values()), by_curve
    guidance = [plot for key, plots in shown.items() if key.startswith("Guidance weight") for plot in plots]
    assert len(guidance) == 2
    losses = [key for key in shown if key.startswith("reports/train_vae/live/plots/metrics/")]
    assert len(losses) >= 4, list(shown)


def test_evaluate_names_missing_models(tmp_path, threads_restored):
    params = parse_params(smoke_params(prepare={"max_per_class": 10}))
    paths = Paths(tmp_path)
    prepare.run(params.data, params.prepare, paths)
    weights = tmp_path / "fid_net.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_fid_network().state_dict(), weights)
    config = params.evaluate.model_copy(update={
        "n_samples": 20, "sweep_samples": 20, "classifier_steps": 5,
        "fid_module": "tests.stages.test_latent_stages:tiny_fid_network", "fid_weights": str(weights)})
    torch.set_num_threads(2)  # compute.threads: null leaves the process's threads as they are
    summary = evaluate.run(config, params.compute.device, params.compute.threads, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert [note.split(":")[1].strip() for note in metrics["notes"]] == [
        "run the 'train_vae' stage to evaluate it", "run the 'train_ldm' stage to evaluate it",
        "run the 'distill' stage to evaluate it"]
    assert "teacher" not in metrics and metrics["floor"]["20"]["n"] == 20
    assert metrics["classifier"]["training_precision"] == "fp32"  # smoke params: the default
    assert metrics["floor"]["20"]["fid"] > 0  # true FID on the user's own network + local weights file
    timings = metrics["timings"]  # wall seconds per part; the parts do not overlap, so they add up to at most the total
    assert {"real features", "classifier", "floor", "total"} <= set(timings) and timings["classifier"] > 0
    assert sum(seconds for part, seconds in timings.items() if part != "total") <= timings["total"] + 0.05

    # A second run reads the real features and the classifier from the content cache (the session's own, see
    # tests/conftest.py): the same floor, the same classifier weights and accuracy.
    assert metrics["cache"] == {"real_features": False, "classifier": False}
    weights = (paths.reports / "evaluate/classifier/model.safetensors").read_bytes()
    # ... and computes on compute.threads (1: the setting for a shared, busy CPU), which metrics.json records
    torch.set_num_threads(2)
    evaluate.run(config, params.compute.device, 1, paths)
    again = json.loads((paths.reports / "metrics.json").read_text())
    assert metrics["machine"]["torch_threads"] == 2 and again["machine"]["torch_threads"] == 1
    assert again["cache"] == {"real_features": True, "classifier": True}
    assert again["floor"] == metrics["floor"] and again["classifier"] == metrics["classifier"]
    assert (paths.reports / "evaluate/classifier/model.safetensors").read_bytes() == weights
    assert "distill" in summary["markdown"]


def _validation_loss(model_dir, latents_dir) -> float:
    """The objective on fixed validation latents, noise and times: comparable across training runs."""
    generator = load_generator(model_dir)
    split = load_split(latents_dir, "val")
    stats = LatentStats.load(latents_dir / STATS)
    rng = torch.Generator().manual_seed(0)
    x = stats.normalize(split.sample(torch.arange(len(split)), rng))
    with torch.no_grad():
        losses = generator.objective.loss(lambda x_t, t: generator.denoiser(x_t, t, split.labels), x, generator=rng)
    return float(losses.mean())


@pytest.mark.slow
def test_two_process_training_matches_one_process(trained_vae, tmp_path, prefect_api):
    """train_ldm through `accelerate launch` on 2 CPU processes: both ranks run, the result is as good as one
    process with the same global batch, and the run resumes under a different world size."""
    import shutil

    import yaml

    from flows.stages import run_stage

    params, paths = trained_vae
    losses, roots = {}, {}
    for processes in (1, 2):
        root = tmp_path / f"world{processes}"
        shutil.copytree(paths.root / "data", root / "data")
        shutil.copytree(paths.vae, root / "models" / "vae")
        raw = smoke_params(compute={"num_processes": processes},
                           train_ldm={"steps": 40, "checkpoint_every": 20, "grid_per_class": 1})
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        state = run_stage("train_ldm", "params.yaml", str(root))
        assert state.is_completed(), state.message
        trainer = json.loads((root / "checkpoints/train_ldm/step-00000040/trainer.json").read_text())
        assert trainer["world_size"] == processes
        losses[processes] = _validation_loss(root / "models/ldm", root / "data/latents")
        roots[processes] = root
    # Tolerance: the two runs see the same data order but different noise draws, so they agree in quality,
    # not bit for bit; 15% of the one-process validation loss.
    assert abs(losses[2] - losses[1]) < 0.15 * losses[1], losses

    # Resume the two-process run on one process.
    raw = yaml.safe_load((roots[2] / "params.yaml").read_text())
    raw["compute"]["num_processes"], raw["train_ldm"]["steps"] = 1, 50
    (roots[2] / "params.yaml").write_text(yaml.safe_dump(raw))
    state = run_stage("train_ldm", "params.yaml", str(roots[2]))
    assert state.is_completed() and state.result()["resumed_from"] == 40


def tiny_fid_network():
    """A stand-in for a user's Inception-v3: any module returning pooled features, built by a factory."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _copy_project(paths: Paths, tmp_path) -> Paths:
    import shutil

    shutil.copytree(paths.root, tmp_path / "copy", ignore=shutil.ignore_patterns("reports"))
    return Paths(tmp_path / "copy")


def test_distill_reruns_only_what_changed(distilled, tmp_path, capsys, monkeypatch):
    params, shared, _ = distilled
    paths = _copy_project(shared, tmp_path)
    root = paths.checkpoints / "distill"
    couplings = sorted(root.glob("reflow-couplings-*"))
    assert len(couplings) == 1
    capsys.readouterr()
    # A key of one method restarts that method only; the others resume and the couplings are reused.
    changed = params.distill.replace(consistency_intervals=4)
    distill.run(changed, params.compute, paths)
    out = capsys.readouterr().out
    assert "distill consistency: starting over: distill.consistency_intervals changed (8 -> 4)" in out
    assert "distill reflow: resuming from" in out and "distill progressive 1-step: resuming from" in out
    assert sorted(root.glob("reflow-couplings-*")) == couplings
    assert (root / "consistency.stale").is_dir()
    # The teacher's precision while it makes the couplings is theirs: bf16 remakes them (close to float32's) and
    # restarts reflow alone.
    exact = load_file(couplings[0])["data"]
    changed = changed.replace(reflow_precision="bf16")
    distill.run(changed, params.compute, paths)
    out = capsys.readouterr().out
    assert 'distill reflow: starting over: distill.reflow_precision changed ("fp32" -> "bf16")' in out, out
    assert out.count("starting over") == 1, out
    couplings = sorted(root.glob("reflow-couplings-*"))
    rounded = load_file(couplings[0])["data"]
    assert len(couplings) == 1 and not torch.equal(rounded, exact)
    assert (rounded - exact).abs().mean() < 0.05 * exact.std()
    # auto is the precision it resolves to on the machine: where bf16 is computed in hardware, that run resumes.
    monkeypatch.setattr("gmpipe.precision.fast_bf16", lambda device: True)
    distill.run(changed.replace(reflow_precision="auto"), params.compute, paths)
    out = capsys.readouterr().out
    assert "distill reflow: resuming from" in out and "starting over" not in out, out
    assert sorted(root.glob("reflow-couplings-*")) == couplings
    monkeypatch.undo()
    # A new guidance weight changes every student and the teacher couplings reflow trains on.
    guided = changed.replace(guidance=2.0)
    distill.run(guided, params.compute, paths)
    out = capsys.readouterr().out
    assert out.count("starting over: distill.guidance changed (1.0 -> 2.0)") == 5, out
    remade = sorted(root.glob("reflow-couplings-*"))
    assert len(remade) == 1 and remade != couplings
    assert json.loads((paths.student / "reflow" / "student.json").read_text())["guidance_folded"] == 2.0
    # Where bf16 is emulated, auto is float32: that bf16 run's couplings and reflow student start over, nothing else.
    monkeypatch.setattr("gmpipe.precision.fast_bf16", lambda device: False)
    distill.run(guided.replace(reflow_precision="auto"), params.compute, paths)
    out = capsys.readouterr().out
    assert 'distill reflow: starting over: distill.reflow_precision changed ("bf16" -> "fp32")' in out, out
    assert out.count("starting over") == 1, out
    assert json.loads((paths.reports / "distill" / "metrics.json").read_text())["reflow"]["mixed_precision"] == "no"


def test_distill_method_loop_gives_one_method_its_own_steps_and_lr(distilled, tmp_path, capsys):
    """``distill.method_loop``: a method's own lr restarts its students alone, naming the key; more steps for it under
    the constant learning rate continue its checkpoint, and the other methods keep the section's steps."""
    params, shared, _ = distilled
    paths = _copy_project(shared, tmp_path)
    steps = params.distill.loop.steps
    capsys.readouterr()
    own_lr = params.distill.replace(method_loop={"consistency": {"lr": 0.002}})
    distill.run(own_lr, params.compute, paths)
    out = capsys.readouterr().out
    assert "distill consistency: starting over: distill.method_loop.consistency.lr" in out, out
    assert out.count("starting over") == 1, out
    assert "distill reflow: resuming from" in out and "distill progressive 1-step: resuming from" in out
    longer = own_lr.replace(method_loop={"consistency": {"lr": 0.002, "steps": steps + 4}})
    distill.run(longer, params.compute, paths)
    out = capsys.readouterr().out
    assert "starting over" not in out and "distill consistency: resuming from" in out, out
    table = json.loads((paths.reports / "distill" / "metrics.json").read_text())
    assert table["consistency"]["train_steps"] == steps + 4
    assert table["reflow"]["train_steps"] == table["progressive-1step"]["train_steps"] == steps


def test_time_shift_is_stored_and_sampled_on_its_grid(trained_ldm, tmp_path):
    """A teacher and a student trained with time shift 3 are sampled on the shifted grid they were trained on."""
    from gmpipe.diffusion.samplers import time_grid

    params, shared, _ = trained_ldm
    paths = _copy_project(shared, tmp_path)
    teacher_config = params.train_ldm.replace(steps=2, warmup_steps=0, time_shift=3.0, grid_per_class=1)
    train_ldm.run(teacher_config, params.compute, paths)
    student_config = params.distill.replace(methods=["progressive"], progressive_start_steps=2, steps=2,
                                            warmup_steps=0, time_shift=3.0)
    distill.run(student_config, params.compute, paths)
    for folder, steps in ((paths.ldm, 4), (paths.student / "progressive-2step", 2)):
        generator = load_generator(folder)
        assert generator.settings["shift"] == 3.0
        seen = []
        generator.denoiser.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[1].clone()))
        generator.sample_latents(generator.conditioning.encode([0]), SampleNoise([0]),
                                 **{**generator.settings, "steps": steps})
        times = torch.stack([t[0] for t in seen])
        torch.testing.assert_close(times, time_grid(steps, shift=3.0)[:-1])
        assert not torch.allclose(times, time_grid(steps)[:-1])
    assert json.loads((paths.student / "progressive-2step" / "student.json").read_text())["time_shift"] == 3.0


def _two_machines(roots, timeout: float = 400) -> list:
    """`gmpipe stage train_ldm` as machine 0 in roots[0] and machine 1 in roots[1], at the same time, ranks from
    GMPIPE_MACHINE_RANK; returns both finished processes (returncode, stdout, stderr)."""
    import os
    import subprocess

    from tests.conftest import BIN

    processes = []
    for rank, root in enumerate(roots):
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                   GMPIPE_MACHINE_RANK=str(rank), OMP_NUM_THREADS="1")
        processes.append(subprocess.Popen(["gmpipe", "stage", "train_ldm", "--root", str(root)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_machines_on_loopback(trained_vae, tmp_path, prefect_api):
    """num_machines: 2 with one process each on 127.0.0.1: two `gmpipe stage train_ldm` in one workspace, their
    ranks from the environment, resume a one-process checkpoint together and complete; machine 0 writes the
    outputs. (A machine that cannot see that checkpoint: tests/train/test_multi_process_resume.py.)"""
    import shutil

    import yaml

    from gmpipe.config.compute import ComputeConfig
    from gmpipe.rendezvous import free_port
    from tests.listening import ListeningWatch

    _, paths = trained_vae
    root = tmp_path / "shared"
    shutil.copytree(paths.root / "data", root / "data")
    shutil.copytree(paths.vae, root / "models" / "vae")
    port = free_port()
    raw = smoke_params(compute={"num_processes": 1, "num_machines": 2, "main_process_ip": "127.0.0.1",
                                "main_process_port": port, "threads": 1},
                       train_ldm={"steps": 10, "warmup_steps": 0, "checkpoint_every": 5, "log_every": 5,
                                  "grid_per_class": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    five = parse_params(raw).train_ldm.replace(steps=5)
    train_ldm.run(five, ComputeConfig(threads=1), Paths(root))  # a one-process checkpoint at step 5
    shutil.rmtree(root / "models" / "ldm")

    with ListeningWatch(str(root)) as watch:
        (code_0, out_0, err_0), (code_1, out_1, err_1) = _two_machines([root, root])
    assert code_0 == 0, (out_0[-2000:], err_0[-2000:])
    assert code_1 == 0, (out_1[-2000:], err_1[-2000:])
    checkpoints = root / "checkpoints/train_ldm"
    assert json.loads((checkpoints / "step-00000010/trainer.json").read_text())["world_size"] == 2
    assert json.loads((checkpoints / "step-00000005/trainer.json").read_text())["world_size"] == 1  # resumed
    assert json.loads((root / "models/ldm/training.json").read_text())["steps"] == 10
    assert "launching 1 of 2 processes on machine 1 of 2" in out_1 + err_1
    assert ("127.0.0.1", port) in watch.addresses and {a for a, _ in watch.addresses} == {"127.0.0.1"}


@pytest.fixture(scope="module")
def small_decoder(trained_vae):
    params, paths = trained_vae
    return params, paths, train_decoder.run(params.train_decoder, params.compute, paths)


def test_train_decoder_writes_a_diffusers_folder_that_decodes(small_decoder):
    """models/decoder loads with diffusers' own from_pretrained, reads normalized latents, and through gmpipe takes
    raw latents like the autoencoder: images of the right shape, in [-1, 1], near the autoencoder's."""
    from diffusers import AutoencoderTiny

    from gmpipe.decoder_folder import load_small_decoder
    from gmpipe.nn.autoencoder import decode_latents

    params, paths, summary = small_decoder
    config = params.train_decoder
    assert summary["steps"] == config.loop.steps and summary["resumed_from"] == 0
    metrics = json.loads((paths.reports / "train_decoder/metrics.json").read_text())
    assert metrics["final_loss"] < metrics["first_loss"]
    assert metrics["test_n"] == config.eval_images and metrics["parameters"] < metrics["autoencoder_decoder_parameters"]
    assert all(value > 0 for value in metrics["decode_images_per_second"].values())
    tiny = AutoencoderTiny.from_pretrained(paths.decoder)
    assert tiny.config.latent_channels == 4 and tiny.config.decoder_block_out_channels == [config.width] * 3
    assert (paths.decoder / "latent_stats.json").read_text() == (paths.latents / STATS).read_text()

    small, info = load_small_decoder(paths.decoder)
    assert info.latent_shape == [4, 8, 8] and info.image_shape == [1, 32, 32]
    z = load_split(paths.latents, "test").mean[:5]
    stats = LatentStats.load(paths.latents / STATS)
    with torch.no_grad():
        direct = tiny.decode(stats.normalize(z)).sample  # diffusers alone, as the decoder's docstring says
        images = decode_latents(small, z)
        full = decode_latents(load_autoencoder(paths.vae), z)
    torch.testing.assert_close(images, direct.clamp(-1, 1))
    assert images.shape == full.shape == (5, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert float((images - full).abs().mean()) == pytest.approx(metrics["test_l1_vs_autoencoder"], abs=0.15)


def test_train_decoder_resumes_by_fingerprint(small_decoder, tmp_path, capsys):
    """Killed after its last checkpoint (outputs gone), the stage finishes from it; more steps continue at a constant
    learning rate and start over under a cosine one; a changed size or target pool starts over with one line naming
    the key."""
    params, shared, _ = small_decoder
    shutil.copytree(shared.root, tmp_path / "copy")
    paths = Paths(tmp_path / "copy")
    shutil.rmtree(paths.decoder)
    config = params.train_decoder
    steps = config.loop.steps
    capsys.readouterr()
    again = train_decoder.run(config, params.compute, paths)
    assert again["resumed_from"] == steps and (paths.decoder / "diffusion_pytorch_model.safetensors").is_file()
    assert f"train_decoder: resuming from {paths.checkpoints / 'train_decoder'}" in capsys.readouterr().out
    more = train_decoder.run(config.replace(steps=steps + 2), params.compute, paths)
    assert more["resumed_from"] == steps and more["steps"] == steps + 2
    other = train_decoder.run(config.replace(width=4), params.compute, paths)
    assert other["resumed_from"] == 0
    assert "train_decoder: starting over: train_decoder.width changed (8 -> 4)" in capsys.readouterr().out
    pooled = train_decoder.run(config.replace(width=4, target_pool=48), params.compute, paths)
    assert pooled["resumed_from"] == 0 and pooled["metrics"]["target_pool"] == 48
    assert pooled["metrics"]["target_pool_seconds"] > 0
    out = capsys.readouterr().out
    assert "train_decoder: starting over: train_decoder.target_pool changed (0 -> 48)" in out
    assert "train_decoder: target pool: 48 posterior samples decoded in" in out
    shutil.rmtree(paths.decoder)  # killed after its last checkpoint: the pool is not decoded again for no step
    finished = train_decoder.run(config.replace(width=4, target_pool=48), params.compute, paths)
    assert finished["resumed_from"] == steps and finished["metrics"]["target_pool_seconds"] is None
    assert "target pool" not in capsys.readouterr().out
    # Under a decaying learning rate the length defines the run: a checkpoint of a shorter one trained at other
    # rates, so more steps start over, naming them.
    cosine = config.replace(width=4, lr_schedule="cosine")
    train_decoder.run(cosine, params.compute, paths)
    assert 'train_decoder.lr_schedule changed ("constant" -> "cosine")' in capsys.readouterr().out
    killed = train_decoder.run(cosine, params.compute, paths)  # the same run again still finishes from its checkpoint
    assert killed["resumed_from"] == steps
    longer = train_decoder.run(cosine.replace(steps=steps + 2), params.compute, paths)
    assert longer["resumed_from"] == 0 and longer["steps"] == steps + 2
    assert f"train_decoder: starting over: train_decoder.steps changed ({steps} -> {steps + 2})" in \
        capsys.readouterr().out


def test_train_decoder_compares_the_perceptual_blocks_asked_for(small_decoder, tmp_path, monkeypatch, capsys):
    """With a perceptual term, the stage's feature network returns the maps of ``perceptual_blocks``, and other blocks
    start over with one line naming the key."""
    from gmpipe.nn import features

    built = []

    class Recorded(features.EffNetLite0Features):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.map_blocks)

    monkeypatch.setattr(features, "EffNetLite0Features", Recorded)
    params, shared, _ = small_decoder
    shutil.copytree(shared.root, tmp_path / "copy")
    paths = Paths(tmp_path / "copy")
    config = params.train_decoder.replace(width=4, perceptual_weight=1.0, perceptual_blocks=[2, 0])
    first = train_decoder.run(config, params.compute, paths)
    assert built == [(0, 2)] and first["resumed_from"] == 0
    live = json.loads((paths.reports / "train_decoder/live/metrics.json").read_text())
    assert live["decoder"]["perceptual"] > 0
    capsys.readouterr()
    other = train_decoder.run(config.replace(perceptual_blocks=[0, 1]), params.compute, paths)
    assert built[-1] == (0, 1) and other["resumed_from"] == 0
    assert "train_decoder: starting over: train_decoder.perceptual_blocks changed ([0, 2] -> [0, 1])" in \
        capsys.readouterr().out


def test_train_decoder_refuses_missing_or_foreign_latents(trained_vae, tmp_path, monkeypatch):
    """No cached latents, latents with other channels than the autoencoder's, or no training latents: one line naming
    the stage to rerun; a target pool larger than half the available memory: one line naming the key. Nothing
    written."""
    from gmpipe.data.latents import LatentSplit, save_split

    params, shared = trained_vae
    paths = Paths(tmp_path / "copy")
    shutil.copytree(shared.vae, paths.vae)
    with pytest.raises(GmpipeError, match="run the 'cache_latents' stage first") as missing:
        train_decoder.run(params.train_decoder, params.compute, paths)
    shutil.copytree(shared.latents, paths.latents)
    n = 8
    save_split(paths.latents, "train", LatentSplit(torch.randn(n, 3, 8, 8), torch.ones(n, 3, 8, 8),
                                                   torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)))
    with pytest.raises(GmpipeError, match="latents with 3 channels .* but .* reads 4; rerun the 'cache_latents'") \
            as foreign:
        train_decoder.run(params.train_decoder, params.compute, paths)
    save_split(paths.latents, "train", LatentSplit(torch.zeros(0, 4, 8, 8), torch.ones(0, 4, 8, 8),
                                                   torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(GmpipeError, match="no training latents to learn from; rerun the 'cache_latents' stage") \
            as empty:
        train_decoder.run(params.train_decoder, params.compute, paths)
    shutil.rmtree(paths.latents)
    shutil.copytree(shared.latents, paths.latents)
    monkeypatch.setattr(train_decoder, "available_memory_bytes", lambda: 2**30)
    with pytest.raises(GmpipeError, match=r"train_decoder.target_pool: 1000000 decoded targets take 4.8 GiB, more "
                                          r"than half the 1.0 GiB of memory available; lower it") as large:
        train_decoder.run(params.train_decoder.replace(target_pool=1_000_000), params.compute, paths)
    assert "\n" not in str(missing.value) + str(foreign.value) + str(empty.value) + str(large.value)
    assert not paths.decoder.exists() and not (paths.checkpoints / "train_decoder").exists()


def test_small_decoder_decodes_the_students_everywhere(distilled, small_decoder, tmp_path, capsys):
    """The same student through load_generator, `gmpipe sample --decoder` and the diffusers pipeline's decoder
    component: the same images; a decoder of another autoencoder, or for a model that makes no latents, is one
    clear line."""
    from diffusers import AutoencoderTiny

    _, paths, _ = distilled
    folder = paths.student / "progressive-1step"
    student = load_generator(folder, autoencoder=paths.vae, decoder=paths.decoder)
    small, _ = student.generate([3, 7], seeds=[0, 1])
    student.use_decoder(None)
    full, _ = student.generate([3, 7], seeds=[0, 1])
    assert small.shape == full.shape == (2, 1, 32, 32) and small.dtype == np.uint8 and not np.array_equal(small, full)

    out = tmp_path / "small.npz"
    assert main(["sample", "--model", str(folder), "--vae", str(paths.vae), "--decoder", str(paths.decoder),
                 "--classes", "3", "7", "-n", "1", "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["images"], small)

    pipe = LatentDiffusionPipeline.from_pretrained(folder, decoder=AutoencoderTiny.from_pretrained(paths.decoder))
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    images = pipe(class_labels=[3, 7], generator=generators, output_type="pt").images
    np.testing.assert_array_equal((images * 255).round().to(torch.uint8).numpy(), small)
    pipe.save_pretrained(tmp_path / "with_decoder")
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "with_decoder")
    assert isinstance(again.decoder, AutoencoderTiny)
    images = again(class_labels=[3, 7], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                   output_type="pt").images
    np.testing.assert_array_equal((images * 255).round().to(torch.uint8).numpy(), small)

    foreign = tmp_path / "foreign"
    shutil.copytree(paths.decoder, foreign)
    info = json.loads((foreign / "decoder.json").read_text())
    (foreign / "decoder.json").write_text(json.dumps({**info, "autoencoder_sha256": "0" * 64}))
    capsys.readouterr()
    for model, decoder, why in ((folder, foreign, "distilled from another autoencoder than"),
                                (paths.vae, paths.decoder, "generates images, not latents")):
        code = main(["sample", "--model", str(model), "--vae", str(paths.vae), "--decoder", str(decoder),
                     "--device", "cpu", "--out", str(tmp_path / "never.png")])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and why in err and "Traceback" not in err, err
    assert not (tmp_path / "never.png").exists()
