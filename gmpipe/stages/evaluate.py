"""``evaluate``: measure every model that exists against the real test set, sweep NFE and guidance, write
``reports/metrics.json`` (DVC metrics), plot data (DVC plots), grids, the generated samples, and a report.

Models are found by their ``family.json`` under ``models/`` (``gmpipe.family_file.find_model_folders``), whatever
their family: the teacher (``models/ldm``) gets the guidance and NFE sweeps, each student (a folder with
``student.json``) its designed step counts, every other model its own default settings; each that defines a
density also its test likelihood. All of them meet in one family table (``gmpipe.eval.families``).

Whatever upstream model is missing is named in the report and skipped, never a crash. Every distance comes
with its n; models are compared only at equal n against the same real images.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gmpipe.artifacts import atomic_file, write_json
from gmpipe.config.evaluate import EvaluateConfig
from gmpipe.data.prepared import load_manifest, load_split
from gmpipe.device import resolve_device
from gmpipe.distill.student import read_student_info, student_folders
from gmpipe.errors import GmpipeError
from gmpipe.eval import end_to_end, families, previous_run, report, training_curves
from gmpipe.eval.autoencoder import autoencoder_metrics
from gmpipe.eval.generated import Reference
from gmpipe.eval.grids import save_grid
from gmpipe.eval.previous_run import CommittedRun
from gmpipe.eval.sample_bank import SampleBank
from gmpipe.eval.timings import SectionTimer
from gmpipe.family_file import find_model_folders
from gmpipe.generator import Generator, Likelihood, load_decoder_for, load_generator
from gmpipe.nn.autoencoder import load_autoencoder
from gmpipe.paths import Paths
from gmpipe.pixels import uint8_to_signed
from gmpipe.precision import resolve_precision
from gmpipe.registry import MODEL_FAMILIES
from gmpipe.seeds import seed_block

SECTIONS = ("evaluate", "compute.device", "compute.threads")
# Seed blocks (gmpipe.seeds.seed_block): the samples of every model, sweeps and headline sets alike (sample i of
# every set has seed i of this block, so a sweep point at a headline setting is the headline set's first n), and the
# random draws of the test likelihoods. Block 0 (the sweeps' own, before they shared the headline seeds) is unused.
HEADLINE_SEEDS, LIKELIHOOD_SEEDS = 1, 2


def _out(paths: Paths) -> Path:
    return paths.reports / "evaluate"


def _load(config: EvaluateConfig, paths: Paths, folder: Path, device: torch.device, **options) -> Generator:
    """A trained model generating at ``evaluate.precision`` (resolved by ``run``), decoding with the autoencoder."""
    return load_generator(folder, autoencoder=paths.vae, device=device, precision=config.precision,
                          precision_key="evaluate.precision", **options)


def balanced_labels(n: int, num_classes: int) -> list[int]:
    return [i % num_classes for i in range(n)]


def save_samples(directory: Path, name: str, images: np.ndarray, labels, **meta) -> str:
    """The exact uint8 images a metric was computed on, with labels and how they were made."""
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / f"{name}.npz"
    with atomic_file(file, "wb") as handle:
        np.savez_compressed(handle, images=images, labels=np.array(labels or [], dtype=np.int64),
                            **{k: np.array(v) for k, v in meta.items()})
    return file.name


def build_reference(config: EvaluateConfig, paths: Paths, class_names: list[str], device: torch.device,
                    timer: SectionTimer) -> tuple[Reference, dict]:
    """The real test set every model is measured against (features, the classifier) and the real-data floor at
    each n used. The features and the classifier depend on the prepared data alone and come from the content
    cache when an earlier run made them (``gmpipe.eval.real_data``)."""
    from gmpipe.content_cache import ContentCache
    from gmpipe.eval.classifier import save_classifier
    from gmpipe.eval.real_data import data_hashes, real_classifier, real_features, select_real
    from gmpipe.nn.features import EffNetLite0Features

    cache = ContentCache.from_environment(log=tqdm.write)
    train, test = load_split(paths.prepared, "train"), load_split(paths.prepared, "test")
    n_ref = min(max(config.n_samples, config.sweep_samples), len(test))
    floor_ns = {min(config.n_samples, n_ref), min(config.sweep_samples, n_ref)}
    selection = select_real(config.seed, len(test), len(train), n_ref, floor_ns, config.n_samples)
    data = data_hashes(paths.prepared)
    with timer.section("real features"):
        extractor = EffNetLite0Features(image_size=config.feature_image_size).to(device)
        features = real_features(extractor, train, test, selection, data, config.seed, config.feature_batch_size,
                                 device, cache)

    with timer.section("classifier"):
        classifier = real_classifier(train, test, len(class_names), config.classifier_steps,
                                     config.classifier_batch_size, config.seed, data, device, cache, progress=True,
                                     precision=config.classifier_precision)
        save_classifier(classifier.model, _out(paths) / "classifier")

    extra = {}
    if config.fid_weights:
        with timer.section("real features (fid)"):
            extra["fid"] = _fid_extractor(config, uint8_to_signed(test.images[selection.test_order]), device)
    reference = Reference(features.test, extractor, classifier.model, extra, config.kid_subsets, config.pr_k,
                          config.feature_batch_size)

    # The real-data floor: train vs test images, at each n used below.
    floor = {}
    with timer.section("floor"):
        for n, order in selection.floor_orders.items():
            floor[str(n)] = reference.measure(uint8_to_signed(train.images[order]), features=features.floor[n])
    return reference, {"classifier_test_accuracy": classifier.test_accuracy, "classifier_test_n": classifier.test_n,
                       "floor": floor, "n_reference": n_ref, "autoencoder_features": features.autoencoder,
                       "cached": {"real_features": features.cached, "classifier": classifier.cached}}


def _fid_extractor(config: EvaluateConfig, test_images: torch.Tensor, device: torch.device):
    import importlib

    from gmpipe.nn.features import load_state_dict_features

    if not config.fid_module or ":" not in config.fid_module:
        raise GmpipeError("evaluate.fid_module: give 'package.module:factory' together with evaluate.fid_weights")
    module_name, factory = config.fid_module.split(":", 1)
    try:
        factory_fn = getattr(importlib.import_module(module_name), factory)
    except (ImportError, AttributeError) as exc:
        raise GmpipeError(f"evaluate.fid_module: cannot import {config.fid_module} ({exc})") from None
    if not Path(config.fid_weights).is_file():
        raise GmpipeError(f"evaluate.fid_weights: {config.fid_weights}: file not found")
    extractor = load_state_dict_features(factory_fn, config.fid_weights).to(device)
    return extractor, extractor.extract(test_images, batch_size=config.feature_batch_size)


def choose_guidance(guidance_rows: list[dict], real_accuracy: float) -> float:
    """The headline guidance weight: the lowest-FD w whose samples the classifier recognises at least as well as
    real test images (guidance trades diversity for fidelity; FD alone prefers w = 0, accuracy alone the largest
    w). Without such a w, the most recognisable one; without labels, the lowest FD."""
    if not guidance_rows or "accuracy" not in guidance_rows[0]:
        return min(guidance_rows, key=lambda r: r["fd_effnet"])["w"] if guidance_rows else 0.0
    recognisable = [r for r in guidance_rows if r["accuracy"] >= real_accuracy]
    if recognisable:
        return min(recognisable, key=lambda r: r["fd_effnet"])["w"]
    return max(guidance_rows, key=lambda r: r["accuracy"])["w"]


def measure(reference: Reference, images: np.ndarray, labels: list[int] | None, **options) -> dict:
    """The distances (and, with labels, the class accuracy) of uint8 ``images`` against the real test set
    (``options``: of ``Reference.measure``, e.g. the images' features when they were computed before)."""
    return reference.measure(uint8_to_signed(images), torch.tensor(labels) if labels else None, **options)


def timed_generate(generator: Generator, labels: list[int] | None, seeds: list[int], batch_size: int,
                   **settings) -> tuple[np.ndarray, int, float]:
    """``generator.generate`` and its images per second on this machine (sampling and decoding, wall clock)."""
    start = time.perf_counter()
    images, nfe = generator.generate(labels, seeds, batch_size=batch_size, **settings)
    return images, nfe, len(seeds) / max(time.perf_counter() - start, 1e-9)


def made_with(generator: Generator, **overrides) -> dict:
    """What a row records of the model that made it: its family and the settings it ran with."""
    return {"family": MODEL_FAMILIES.name_of(generator), "settings": generator.resolve_settings(overrides)}


@dataclass(frozen=True)
class HeldOut:
    """The test images every likelihood is measured on: uint8 (n, C, H, W), their labels and one seed each."""

    images: np.ndarray
    labels: list[int]
    seeds: list[int]


def held_out_images(config: EvaluateConfig, paths: Paths) -> HeldOut | None:
    """``likelihood_samples`` test images (a seeded choice), or None when likelihoods are switched off (0)."""
    if config.likelihood_samples == 0:
        return None
    test = load_split(paths.prepared, "test")
    order = np.random.default_rng(config.seed).permutation(len(test))[: config.likelihood_samples]
    return HeldOut(test.images[order], test.labels[order].tolist(),
                   seed_block(config.seed, LIKELIHOOD_SEEDS, len(order)))


def held_out_likelihood(generator: Generator, held_out: HeldOut | None, batch_size: int) -> dict | None:
    """The model's test likelihood (``Generator.likelihood``) with the seconds it took, or None when its family
    defines none (or likelihoods are off). Conditional models score each image under its own class."""
    if held_out is None:
        return None
    requests = held_out.labels if generator.conditioning.conditional else None
    start = time.perf_counter()
    likelihood: Likelihood | None = generator.likelihood(held_out.images, requests, held_out.seeds,
                                                         batch_size=batch_size)
    if likelihood is None:
        return None
    return {**likelihood.to_dict(), "seconds": time.perf_counter() - start}


def evaluate_teacher(config: EvaluateConfig, paths: Paths, reference: Reference, class_names: list[str],
                     real_accuracy: float, student_ws: set[float], held_out: HeldOut | None, device: torch.device,
                     timer: SectionTimer):
    """Guidance sweep, then the NFE sweep at the chosen w, then the teacher at n_samples with its default
    sampler and steps: at the chosen w (the headline) and at every w a student was distilled at; then its test
    likelihood. Every set is the first n of one list of samples (the headline seeds and labels), so a point met
    twice is generated and measured once (``gmpipe.eval.sample_bank``)."""
    generator = _load(config, paths, paths.ldm, device)
    conditional = generator.conditioning.conditional
    default = generator.settings
    n_sweep = min(config.sweep_samples, len(reference.features))
    n = min(config.n_samples, len(reference.features))
    n_most = max(n, n_sweep)
    bank = SampleBank(generator, balanced_labels(n_most, len(class_names)) if conditional else None,
                      seed_block(config.seed, HEADLINE_SEEDS, n_most), config.batch_size)
    samples_dir = _out(paths) / "samples"

    def measured(count: int, **settings) -> tuple[np.ndarray, list[int] | None, dict]:
        """The first ``count`` samples at ``settings``, their labels and the row fields they give."""
        drawn = bank.draw(count, **settings)
        labels = None if bank.requests is None else list(bank.requests[:count])
        features = bank.features(count, lambda images: reference.extract(uint8_to_signed(images)), **settings)
        return drawn.images, labels, {"nfe": drawn.nfe, **measure(reference, drawn.images, labels, features=features),
                                      "images_per_second": drawn.images_per_second,
                                      **made_with(generator, **settings)}

    with timer.section("teacher: guidance sweep"):
        guidance_rows = []
        for w in tqdm(config.guidance_sweep if conditional else [0.0], desc="evaluate: guidance sweep", unit="w"):
            images, labels, fields = measured(n_sweep, guidance=w)
            row = {"model": "teacher", "sampler": default["sampler"], "steps": default["steps"], "w": w, **fields}
            row["samples"] = save_samples(samples_dir, f"teacher_w{w:g}", images, labels, model="teacher",
                                          sampler=default["sampler"], steps=default["steps"], w=w)
            guidance_rows.append(row)
    best_w = choose_guidance(guidance_rows, real_accuracy) if conditional else 0.0

    with timer.section("teacher: NFE sweep"):
        nfe_rows = []
        grid = [(sampler, steps) for sampler in config.sweep_samplers for steps in config.sweep_steps]
        for sampler, steps in tqdm(grid, desc="evaluate: NFE sweep", unit="setting"):
            _, _, fields = measured(n_sweep, sampler=sampler, steps=steps, guidance=best_w)
            nfe_rows.append({"model": "teacher", "sampler": sampler, "steps": steps, "w": best_w, **fields})

    with timer.section("teacher: headline samples"):
        by_w = {}
        for w in sorted({best_w} | (student_ws if conditional else set())):
            images, labels, fields = measured(n, guidance=w)
            row = {"model": "teacher", "sampler": default["sampler"], "steps": default["steps"], "w": w, **fields}
            row["samples"] = save_samples(samples_dir, f"teacher_n{n}_w{w:g}", images, labels, model="teacher",
                                          sampler=default["sampler"], steps=default["steps"], w=w)
            _grid(images, labels, class_names, _out(paths) / "grids" / f"teacher_w{w:g}.png")
            by_w[w] = row
    with timer.section("teacher: likelihood"):
        likelihood = held_out_likelihood(generator, held_out, config.batch_size)
    return by_w[best_w], by_w, guidance_rows, nfe_rows, likelihood


def _grid(images: np.ndarray, labels, class_names: list[str], path: Path, per_class: int = 10) -> None:
    """One row per class, named in the margin (the first ``per_class`` samples of each, as many as the rarest
    class has), or the first 80 in rows of 10 for unconditional sets."""
    if labels:
        rows = [[i for i, label in enumerate(labels) if label == c] for c in range(len(class_names))]
        columns = min(per_class, *(len(row) for row in rows))
        if columns > 0:
            save_grid(images[[i for row in rows for i in row[:columns]]], path, columns=columns,
                      row_labels=class_names)
            return
    save_grid(images[: min(80, len(images))], path, columns=10)


def evaluate_students(config: EvaluateConfig, paths: Paths, reference: Reference, class_names: list[str],
                      device: torch.device, timer: SectionTimer) -> list:
    """Every student at the step counts it was distilled for (those of ``student_steps``, else its first). A
    few-step student's network is trained at its own step times only, so its ODE defines no density to report."""
    rows = []
    n = min(config.n_samples, len(reference.features))
    seeds = seed_block(config.seed, HEADLINE_SEEDS, n)
    for folder in tqdm(student_folders(paths.student), desc="evaluate: students", unit="student"):
        with timer.section(f"student {folder.name}"):
            rows += evaluate_student(config, paths, folder, reference, class_names, seeds, device)
    return rows


def evaluate_student(config: EvaluateConfig, paths: Paths, folder: Path, reference: Reference,
                     class_names: list[str], seeds: list[int], device: torch.device) -> list:
    """One student's rows: at each step count it was distilled for (``evaluate_students``)."""
    rows = []
    n = len(seeds)
    info = read_student_info(folder)
    generator = _load(config, paths, folder, device, missing_stage="distill")
    labels = balanced_labels(n, len(class_names)) if generator.conditioning.conditional else None
    designed = [s for s in config.student_steps if s in info.steps] or info.steps[:1]
    for steps in designed:
        images, nfe, speed = timed_generate(generator, labels, seeds, config.batch_size, steps=steps)
        row = {"model": f"student:{folder.name}", "method": info.method,
               "sampler": generator.settings["sampler"], "steps": steps, "nfe": nfe, "w": info.guidance_folded,
               **measure(reference, images, labels), "images_per_second": speed,
               **made_with(generator, steps=steps)}
        row["samples"] = save_samples(_out(paths) / "samples", f"{folder.name}_{steps}step", images, labels,
                                      model=folder.name, sampler=row["sampler"], steps=steps, w=row["w"])
        rows.append(row)
        _grid(images, labels, class_names, _out(paths) / "grids" / f"{folder.name}_{steps}step.png")
    return rows


def evaluate_one_step_end_to_end(config: EvaluateConfig, paths: Paths, reference: Reference,
                                 class_names: list[str], student_rows: list[dict], device: torch.device) -> dict:
    """The best one-step student (lowest FD among the rows at 1 network evaluation) and the guided teacher (at the
    student's folded w), end to end with the autoencoder's decoder and with the small one (``gmpipe.eval.
    end_to_end``): the student on its family-table row's seeds, labels and n, the teacher on one batch of them."""
    best = min((row for row in student_rows if row["nfe"] == 1), key=lambda row: row["fd_effnet"])
    name = best["model"].split(":", 1)[1]
    student = _load(config, paths, paths.student / name, device, missing_stage="distill")
    teacher = _load(config, paths, paths.ldm, device)
    small = load_decoder_for(paths.decoder, paths.vae)
    n = best["n"]
    labels = balanced_labels(n, len(class_names)) if student.conditioning.conditional else None
    teacher_w = best.get("teacher_w", teacher.settings["guidance"])
    figures, images = end_to_end.measure_end_to_end(
        teacher, student, small, teacher_settings={"guidance": teacher_w}, student_settings={"steps": best["steps"]},
        labels=labels, seeds=seed_block(config.seed, HEADLINE_SEEDS, n), timing_images=config.batch_size,
        batch_size=config.batch_size, fd_of=lambda found: measure(reference, found, labels)["fd_effnet"],
        fd_full=best["fd_effnet"])
    figure_name = f"{name}_{best['steps']}step_small_decoder"
    save_samples(_out(paths) / "samples", figure_name, images, labels, model=name, steps=best["steps"],
                 decoder=paths.name(paths.decoder))
    _grid(images, labels, class_names, _out(paths) / "grids" / f"{figure_name}.png")
    return {"student": name, "steps": best["steps"], "samples": f"{figure_name}.npz",
            "teacher": {**teacher.resolve_settings({"guidance": teacher_w})}, **figures}


def other_model_folders(paths: Paths) -> list[Path]:
    """Every model folder under ``models/`` that is neither the teacher nor a student, whatever its family (the
    autoencoder's own ``vae_prior`` folder, an autoregressive prior, a GAN, ...)."""
    students = set(student_folders(paths.student))
    return [folder for folder in find_model_folders(paths.models) if folder != paths.ldm and folder not in students]


def evaluate_model(config: EvaluateConfig, paths: Paths, folder: Path, reference: Reference,
                   class_names: list[str], held_out: HeldOut | None, device: torch.device,
                   timer: SectionTimer) -> tuple[dict, dict | None]:
    """A model at its own default settings, at n_samples (class-balanced labels if it is conditional), and its
    test likelihood if its family defines one."""
    name = folder.relative_to(paths.models).as_posix()
    with timer.section(f"model {name}: samples"):
        generator = _load(config, paths, folder, device)
        n = min(config.n_samples, len(reference.features))
        labels = balanced_labels(n, len(class_names)) if generator.conditioning.conditional else None
        images, nfe, speed = timed_generate(generator, labels, seed_block(config.seed, HEADLINE_SEEDS, n),
                                            config.batch_size)
        row = {"model": name, "nfe": nfe, **measure(reference, images, labels), "images_per_second": speed,
               **made_with(generator)}
        file_name = name.replace("/", "_")
        row["samples"] = save_samples(_out(paths) / "samples", f"{file_name}_n{n}", images, labels, model=name,
                                      family=row["family"], settings=families.describe_settings(row["settings"]))
        _grid(images, labels, class_names, _out(paths) / "grids" / f"{file_name}.png")
    with timer.section(f"model {name}: likelihood"):
        likelihood = held_out_likelihood(generator, held_out, config.batch_size)
    return row, likelihood


def family_table(teacher_rows: list[dict], sweep_rows: list[dict], student_rows: list[dict], model_rows: list[dict],
                 floor: dict, likelihoods: dict[str, dict | None]) -> list[dict]:
    """The rows of the family table (``gmpipe.eval.families``): the teacher at its default sampler (each w it was
    measured at), the teacher with each sweep sampler at its default step count (or the sweep's largest), every
    student at its designed steps, every other model; each with the floor at its n and its model's likelihood."""
    chosen_sweep = []
    if sweep_rows and teacher_rows:
        default_steps = teacher_rows[0]["steps"]
        swept = sorted({row["steps"] for row in sweep_rows})
        steps = default_steps if default_steps in swept else swept[-1]
        chosen_sweep = [row for row in sweep_rows if row["steps"] == steps]
    table = []
    for row in [*teacher_rows, *chosen_sweep, *student_rows, *model_rows]:
        table.append(families.family_row(row["family"], row["model"], row["settings"], row, floor[str(row["n"])],
                                         row["images_per_second"], likelihoods.get(row["model"])))
    return table


def machine() -> dict:
    """Where the speeds were measured: CPUs, torch threads and the 1-minute load average when evaluate started."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _code_version(root: Path) -> str:
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                                timeout=10)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def run(config: EvaluateConfig, device: str, threads: int | None, paths: Paths) -> dict:
    """``device`` is ``compute.device``: where sampling, the feature networks and the classifier run; ``threads``
    is ``compute.threads``, torch's threads on a CPU (None: torch's default), as in the training stages."""
    device = resolve_device(device)  # before any work: a device that is not there fails at once
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    # auto resolved here, so the classifier's cache key and metrics.json name what ran
    config = config.replace(precision=resolve_precision(config.precision, device, "evaluate.precision"),
                            classifier_precision=resolve_precision(config.classifier_precision, device,
                                                                   "evaluate.classifier_precision"))
    manifest = load_manifest(paths.prepared)
    class_names = manifest["class_names"]
    upstream = (("autoencoder", paths.vae, "train_vae"), ("teacher denoiser", paths.ldm, "train_ldm"),
                ("distilled students", paths.student, "distill"))
    notes = [f"no {name} in {folder}: run the '{stage}' stage to evaluate it"
             for name, folder, stage in upstream if not folder.is_dir()]
    torch.manual_seed(config.seed)
    timer = SectionTimer(log=tqdm.write, prefix="evaluate: ")
    started = time.perf_counter()
    metrics: dict = {"machine": {**machine(), "device": str(device), "generation_precision": config.precision}}
    reference, real = build_reference(config, paths, class_names, device, timer)
    metrics.update({"classifier": {"test_accuracy": real["classifier_test_accuracy"],
                                   "test_n": real["classifier_test_n"],
                                   "training_precision": config.classifier_precision},
                    "floor": real["floor"], "cache": real["cached"]})
    if paths.vae.is_dir():
        with timer.section("autoencoder"):
            train, test = load_split(paths.prepared, "train"), load_split(paths.prepared, "test")
            metrics["vae"] = autoencoder_metrics(
                load_autoencoder(paths.vae).to(device), test.images, train.images, reference.extractor,
                n=config.n_samples, seed=config.seed, device=device, real_features=real["autoencoder_features"])
    held_out = held_out_images(config, paths)
    likelihoods: dict[str, dict | None] = {}
    guidance_rows, nfe_rows, student_rows, teacher_rows, model_rows = [], [], [], [], []
    if paths.vae.is_dir() and paths.ldm.is_dir():
        student_ws = {read_student_info(f).guidance_folded for f in student_folders(paths.student)}
        headline, teacher_by_w, guidance_rows, nfe_rows, likelihoods["teacher"] = evaluate_teacher(
            config, paths, reference, class_names, real["classifier_test_accuracy"], student_ws, held_out, device,
            timer)
        floor = real["floor"][str(headline["n"])]["fd_effnet"]
        for row in teacher_by_w.values():
            row["fd_ratio_to_floor"] = row["fd_effnet"] / max(floor, 1e-12)
        teacher_rows = [teacher_by_w[w] for w in sorted(teacher_by_w, key=lambda w: w != headline["w"])]
        metrics["teacher"] = headline
        metrics["teacher_by_w"] = {f"w{w:g}": row for w, row in teacher_by_w.items()}
        student_rows = evaluate_students(config, paths, reference, class_names, device, timer)
        for row in student_rows:
            teacher = teacher_by_w.get(float(row["w"]), headline)
            row["fd_ratio_to_teacher"] = row["fd_effnet"] / max(teacher["fd_effnet"], 1e-12)
            row["teacher_w"] = teacher["w"]
            row["fd_ratio_to_floor"] = row["fd_effnet"] / max(floor, 1e-12)
        metrics["students"] = {f"{r['model'].split(':', 1)[1]}_{r['steps']}step": r for r in student_rows}
        metrics["targets"] = {"sde_vs_euler": families.sde_target(nfe_rows)}
        if not paths.decoder.is_dir():
            notes.append(f"no small decoder in {paths.decoder}: run the 'train_decoder' stage to measure one-step "
                         "generation end to end")
        elif not any(row["nfe"] == 1 for row in student_rows):
            notes.append("no one-step student: one-step generation end to end is not measured")
        else:
            metrics["one_step_end_to_end"] = evaluate_one_step_end_to_end(config, paths, reference, class_names,
                                                                          student_rows, device)
    if paths.vae.is_dir():  # every other family decodes with the autoencoder (the VAE prior is the autoencoder)
        for folder in tqdm(other_model_folders(paths), desc="evaluate: other models", unit="model"):
            row, likelihoods[folder.relative_to(paths.models).as_posix()] = evaluate_model(
                config, paths, folder, reference, class_names, held_out, device, timer)
            model_rows.append(row)
        metrics["models"] = {row["model"]: row for row in model_rows}
    metrics["likelihoods"] = {name: value for name, value in likelihoods.items() if value is not None}
    table = family_table(teacher_rows, nfe_rows, student_rows, model_rows, real["floor"], likelihoods)
    metrics["families"] = {families.row_key(row): row for row in table}
    metrics["notes"] = notes

    out = _out(paths)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    nfe_curve = [dict(r, curve=f"teacher {r['sampler']}") for r in nfe_rows]
    nfe_curve += [dict(r, curve=r["model"]) for r in student_rows]
    _write_csv(plots / "nfe_sweep.csv", nfe_curve, ["curve", "model", "sampler", "steps", "nfe", "w", "n",
                                                    "fd_effnet", "kid", "accuracy", "images_per_second"])
    _write_csv(plots / "guidance_sweep.csv", guidance_rows, ["w", "n", "nfe", "fd_effnet", "kid", "accuracy",
                                                             "precision", "recall"])
    n_headline = min(config.n_samples, real["n_reference"])
    headline_rows = [row for row in table if row["n"] == n_headline]
    _write_csv(plots / "families.csv", [dict(row, curve=f"{row['model']} ({row['family']})") for row in headline_rows],
               ["curve", "model", "family", "settings", "nfe", "n", "fd_effnet", "fd_minus_floor", "images_per_second"])
    # Wall seconds per part of this run (what the report and the summary show, before they are written).
    metrics["timings"] = {**timer.rounded(), "total": round(time.perf_counter() - started, 2)}
    tqdm.write(f"evaluate: total: {metrics['timings']['total']:.1f} s")
    write_json(paths.reports / "metrics.json", _finite(metrics))
    write_report(paths, n_headline)
    return {
        "read": [str(paths.prepared), *(str(f) for f in find_model_folders(paths.models))],
        "wrote": [str(paths.reports / "metrics.json"), str(paths.reports / "report.html"), str(out)],
        "notes": notes,
        "markdown": summary_table(metrics, table),
    }


def _finite(value):
    """JSON without NaN/Infinity (DVC and most JSON readers reject them): non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def likelihood_lines(likelihoods: dict[str, dict]) -> list[str]:
    """One line per model with a test likelihood: value, error, what it is, its caveat."""
    lines = []
    for name, value in likelihoods.items():
        parts = "".join(f"; {key.replace('_', ' ')} {number:.4g}" for key, number in value["parts"].items())
        lines.append(f"- {name}: {value['bits']:.4f} +- {value['standard_error']:.4f} {value['unit']} of "
                     f"{value['space']} ({value['kind']}; {value['method']}; n = {value['n']}{parts}; "
                     f"{value['seconds']:.1f} s). Caveat: {value['caveat']}.")
    return lines


def sde_line(target: dict) -> str:
    if not target.get("measured"):
        return f"Reverse-SDE sampler vs Euler: not measured ({target.get('reason', 'no teacher')})."
    verdict = "met" if target["met"] else "not met"
    return (f"Reverse-SDE sampler vs Euler at {target['steps']} steps (NFE {target['nfe']}, n = {target['n']}): FD "
            f"{target['fd_sde']:.1f} vs {target['fd_euler']:.1f}, ratio {target['ratio']:.3f} (target <= "
            f"{target['target_ratio']:g}: {verdict}).")


def summary_table(metrics: dict, table: list[dict]) -> str:
    """The Prefect artifact: the family table, then the autoencoder, the likelihoods, the targets, the notes."""
    lines = ["Every model, one row per setting it was measured at (FD-EffNetLite0 against as many real test images; "
             "floor: train vs test images at the same n; images/s include decoding, on this machine "
             f"({metrics['machine']['cpus']} CPUs, load {metrics['machine']['load_average_1min']}):", "",
             families.markdown_table(table)]
    vae = metrics.get("vae")
    if vae:
        lines += ["", f"Autoencoder (n={vae['n']}): PSNR {vae['psnr']:.2f} dB, SSIM {vae['ssim']:.3f}, "
                  f"FD ratio to floor {vae['fd_ratio']:.2f}"]
    if metrics.get("likelihoods"):
        lines += ["", "Test likelihoods (lower is better; different spaces are not comparable):"]
        lines += likelihood_lines(metrics["likelihoods"])
    if "targets" in metrics:
        lines += ["", sde_line(metrics["targets"]["sde_vs_euler"])]
    if "one_step_end_to_end" in metrics:
        lines += ["", end_to_end.summary_line(metrics["one_step_end_to_end"])]
    lines += ["", f"Classifier test accuracy: {metrics['classifier']['test_accuracy']:.3f}"]
    lines += [f"- {note}" for note in metrics.get("notes", [])]
    return "\n".join(lines)


def _read_csv(path: Path) -> list[dict]:
    """Rows of a plot file written by ``_write_csv``, numbers parsed back (ints, floats; empty cells None)."""
    def parse(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text or None

    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: parse(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _change_cell(old: float | None, new: float | None, change: float | None, higher_is_better: bool) -> str:
    """This run's value and its change since the previous run (green better, red worse); the previous value in the
    cell's tooltip."""
    if new is None and old is None:
        return "<td>-</td>"
    text = "-" if new is None else f"{new:.4g}"
    if change is not None:
        css = "" if not change else "better" if (change > 0) == higher_is_better else "worse"
        text += f' <small class="{css}">{change:+.3g}</small>'
    elif new is not None:
        text += ' <small>new</small>'
    return f'<td title="previous: {"-" if old is None else f"{old:.6g}"}">{text}</td>'


def comparison_section(metrics: dict, previous: CommittedRun) -> str:
    """This run's family table and summary numbers beside those of the committed run (``gmpipe.eval.previous_run``):
    each cell this run's value, the change in colour (green better, red worse) and the previous value."""
    columns = previous_run.COMPARED
    head = "<tr><th>row</th>" + "".join(f"<th>{families.HEADERS.get(c, c)}</th>" for c in columns) + "</tr>"
    body = "".join(
        f"<tr><td>{report.html.escape(row['row'])}</td>"
        + "".join(_change_cell(*row[c], c in previous_run.HIGHER_IS_BETTER) for c in columns) + "</tr>"
        for row in previous_run.compare_families(metrics, previous.metrics))
    summary = "".join(f"<tr><td>{report.html.escape(name)}</td>"
                      + _change_cell(old, new, None if old is None or new is None else new - old, higher)
                      + "</tr>" for name, old, new, higher in previous_run.summary_changes(metrics, previous.metrics))
    return (f"<p>Beside the metrics committed in <code>{report.html.escape(previous.commit)}</code> "
            f"({report.html.escape(previous.description)}), what <code>dvc metrics diff</code> compares: this run's "
            "value and its change (green: better, red: worse; the previous value in each cell's tooltip).</p>"
            f"<table>{head}{body}</table><table>{summary}</table>")


def training_section(paths: Paths) -> str:
    """Each training stage's logged loss terms (``reports/<stage>/live``), one small plot per term, and the
    autoencoder's reconstructions (``reports/train_vae/reconstructions.png``: test images above their
    reconstructions)."""
    parts = []
    for live in sorted(paths.reports.glob("*/live")):
        curves = training_curves.read_curves(live)
        if curves:
            stage = live.parent.name
            plots = [report.svg_line_plot({term: points}, "step", term, width=300, height=190,
                                          title=f"{stage}: {term}") for term, points in curves.items()]
            parts.append(f"<h3>{report.html.escape(stage)}</h3>" + report.side_by_side(plots))
    reconstructions = paths.reports / "train_vae" / "reconstructions.png"
    if reconstructions.is_file():
        parts.append("<h3>Autoencoder reconstructions (test images, each above its reconstruction)</h3>"
                     + report.embedded_png(reconstructions, "autoencoder reconstructions"))
    return "".join(parts)


def write_report(paths: Paths, n_headline: int) -> None:
    """``reports/report.html`` from what ``evaluate`` wrote (``metrics.json``, the plot files, the grids), the
    training stages' loss curves and reconstructions, and the metrics last committed to git, if any. Reads only
    files, so a finished run's report can be written again."""
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    table = list(metrics.get("families", {}).values())
    plots = _out(paths) / "plots"
    nfe_curve, guidance_rows = _read_csv(plots / "nfe_sweep.csv"), _read_csv(plots / "guidance_sweep.csv")
    student_rows = list(metrics.get("students", {}).values())
    sections = []
    if metrics.get("notes"):
        sections.append(("Not evaluated", "<ul>" + "".join(f"<li>{n}</li>" for n in metrics["notes"]) + "</ul>"))
    machine_info = metrics["machine"]
    sections.append(("Every model, one table",
                     "<p>One row per model and setting. FD-EffNetLite0 against as many real test images (n); floor: "
                     "train vs test images at the same n; images/s: generation including decoding on this machine "
                     f"({machine_info['cpus']} CPUs, {machine_info['torch_threads']} torch threads, networks in "
                     f"{machine_info.get('generation_precision', 'fp32')}, 1-minute load "
                     f"{machine_info['load_average_1min']} at the start); likelihood: the model's own test "
                     "likelihood, in the unit and space below (not comparable across spaces).</p>"
                     + report.html_table(table, families.COLUMNS, families.HEADERS)))
    figures = []
    series = families.fd_vs_nfe_series(row for row in table if row["n"] == n_headline)
    if series:
        figures.append(report.svg_line_plot(series, "network evaluations per image (log2)",
                                            f"FD-EffNetLite0 (n={n_headline}, log10)", log_x=True, log_y=True,
                                            title=f"Every family, n = {n_headline}"))
    if nfe_curve:
        sweep: dict[str, list] = {}
        for row in nfe_curve:
            sweep.setdefault(row["curve"], []).append((row["nfe"], row["fd_effnet"]))
        figures.append(report.svg_line_plot(sweep, "network evaluations per image (log2)",
                                            f"FD-EffNetLite0 (n={nfe_curve[0]['n']})", log_x=True,
                                            title="Teacher samplers and students"))
    if figures:
        sections.append(("Quality vs network evaluations (lower is better)", report.side_by_side(figures)))
    if len(guidance_rows) > 1:
        fd = {"FD-EffNetLite0": [(r["w"], r["fd_effnet"]) for r in guidance_rows]}
        quality = {k: [(r["w"], r.get(k)) for r in guidance_rows] for k in ("accuracy", "precision", "recall")}
        sections.append(("Guidance: quality vs diversity", report.side_by_side([
            report.svg_line_plot(fd, "guidance weight w", f"FD (n={guidance_rows[0]['n']})"),
            report.svg_line_plot(quality, "guidance weight w", "fraction")])))
    grids = sorted((_out(paths) / "grids").glob("*.png"))
    if grids:
        sections.append(("Samples (one row per class)", report.side_by_side(
            [f"<h3>{report.html.escape(g.stem)}</h3>{report.embedded_png(g, g.stem)}" for g in grids])))
    training = training_section(paths)
    if training:
        sections.append(("Training", training))
    previous = previous_run.committed_metrics(paths.root)
    sections.append(("This run beside the previous one",
                     comparison_section(metrics, previous) if previous else
                     "<p>No committed <code>reports/metrics.json</code> to compare with (commit it after a run, "
                     "with <code>dvc.lock</code>, and the next report shows both).</p>"))
    if metrics.get("likelihoods"):
        sections.append(("Test likelihoods", "<ul>" + "".join(f"<li>{report.html.escape(line[2:])}</li>"
                                                              for line in likelihood_lines(metrics["likelihoods"]))
                         + "</ul>"))
    if "targets" in metrics:
        line = sde_line(metrics["targets"]["sde_vs_euler"])
        sections.append(("Reverse-SDE sampler", f"<p>{report.html.escape(line)}</p>"))
    if "one_step_end_to_end" in metrics:
        figures = metrics["one_step_end_to_end"]
        speeds = [{"model": model, "decoder": decoder, "images_per_second": figures["images_per_second"][
            f"{model}_{decoder}_decoder"], "timed_images": figures["timed_images"][model]}
            for model in ("teacher", "student") for decoder in end_to_end.DECODERS]
        sections.append(("One-step generation end to end",
                         f"<p>{report.html.escape(end_to_end.summary_line(figures))}</p>"
                         + report.html_table(speeds, ["model", "decoder", "images_per_second", "timed_images"])))
    headline = list(metrics.get("teacher_by_w", {}).values()) + student_rows
    columns = ["model", "sampler", "steps", "nfe", "w", "n", "fd_effnet", "fd_ratio_to_floor", "fd_ratio_to_teacher",
               "kid", "precision", "recall", "accuracy"]
    sections.append(("Teacher and students vs the real test set", report.html_table(headline, columns)))
    floor_rows = [{"n": n, **{k: v for k, v in row.items() if k != "n"}} for n, row in metrics["floor"].items()]
    sections.append(("Real-data floor (train vs test images)", report.html_table(floor_rows, ["n", "fd_effnet",
                                                                                           "kid", "precision",
                                                                                           "recall"])))
    if "vae" in metrics:
        sections.append(("Autoencoder reconstructions", report.html_table([metrics["vae"]])))
    sections.append(("Classifier", report.html_table([metrics["classifier"]])))
    if metrics.get("timings"):
        sections.append(("Where the time went (wall seconds on this machine)", report.html_table(
            [{"part": part, "seconds": seconds} for part, seconds in metrics["timings"].items()], ["part", "seconds"])))
    params_text = (paths.root / "params.yaml").read_text() if (paths.root / "params.yaml").is_file() else ""
    sections.append(("Provenance", f"<p>code version: <code>{_code_version(paths.root)}</code></p>"
                                   f"<pre>{report.html.escape(params_text)}</pre>"))
    report.write_html(paths.reports / "report.html", "gmpipe evaluation", sections)
