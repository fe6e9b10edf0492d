"""One-step generation end to end: a one-step student's images/s with the autoencoder's decoder and with the small
decoder (``train_decoder``), against the guided teacher's, and the FD the small decoder costs.

As a section of ``python -m bench`` (:func:`run`; alone: ``python -m bench.one_step_decoding [--quick] [--root
DIR]``): the guided teacher (ROOT/models/ldm, at the student's folded w) and the student ROOT/models/student/
progressive-1step, each with both decoders, in interleaved rounds (``gmpipe.eval.end_to_end.timed_images``, as
``evaluate`` times them), with ROOT/models/decoder; the FD of the student's images with each decoder against the real
test images ``evaluate`` uses (ROOT/data/prepared) at the same n. The sizes are ROOT/params.yaml's ``evaluate``
(n_samples images for the student, one batch for the teacher). Without those models the networks are a randomly
initialised train_ldm DiT (as the teacher, and at 1 unguided step as the student) and the demo autoencoder, and the
small decoder is untrained at ``train_decoder``'s shape: speed does not depend on the weights, but then no FD is
measured. The section never trains: without ROOT/models/decoder its decoder is untrained too.

The full experiment, outside the pipeline (it trains the small decoder for minutes, with ``train_decoder``'s own
``run`` and the ``params.yaml`` section plus JSON overrides, and writes it and its checkpoints under ROOT):

    OMP_NUM_THREADS=2 python -m bench.one_step_decoding ROOT ['{"full_resolution_blocks": 0}'] [STUDENT]

ROOT holds data/latents, data/prepared, models/vae, models/ldm and models/student/STUDENT (default
progressive-1step) of a finished demo run; it measures, as ``evaluate`` does (``gmpipe.eval.end_to_end``), the
student's FD with both decoders and the end-to-end speeds, generating and decoding at ``evaluate.precision``
(bf16 in the demo; until `cf1eaf0` it generated in float32, which read about 0.01 lower than ``evaluate``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.measure import interleave, median, speedup
from bench.report import REPO, Section
from bench.sampling import random_generator
from bench.workloads import params_file
from gmpipe.config.evaluate import EvaluateConfig
from gmpipe.config.params import load_params
from gmpipe.eval import end_to_end
from gmpipe.eval.frechet import frechet_distance_from_features
from gmpipe.paths import Paths
from gmpipe.seeds import seed_block

SIZES = {"full": dict(preset="small", images=None, teacher_images=None, rounds=3),  # None: evaluate's own sizes
         "quick": dict(preset="tiny", images=16, teacher_images=4, rounds=2)}
STUDENT = "progressive-1step"
CASES = {"teacher_full_decoder": "guided teacher + autoencoder decoder",
         "teacher_small_decoder": "guided teacher + small decoder",
         "student_full_decoder": "1-step student + autoencoder decoder",
         "student_small_decoder": "1-step student + small decoder"}


def fd_against_test_images(paths: Paths, ev: EvaluateConfig, n: int):
    """images (n, C, H, W) uint8 -> FD-EffNetLite0 against the first n of the real test images ``evaluate`` compares
    with (chosen as it does: a permutation of the test split by ``evaluate.seed``)."""
    from gmpipe.data.prepared import load_split
    from gmpipe.nn.features import EffNetLite0Features
    from gmpipe.pixels import uint8_to_signed

    test = load_split(paths.prepared, "test")
    if n > len(test):
        raise ValueError(f"{n} images to compare but {paths.prepared} has {len(test)} test images")
    order = np.random.default_rng(ev.seed).permutation(len(test))[:n]
    extractor = EffNetLite0Features(image_size=ev.feature_image_size)
    real = extractor.extract(uint8_to_signed(test.images[order]), batch_size=ev.batch_size)
    return lambda images: frechet_distance_from_features(
        extractor.extract(uint8_to_signed(images), batch_size=ev.batch_size), real)


def untrained_small_decoder(generator, params):
    """A small decoder of ``train_decoder``'s shape for ``generator``'s latents and autoencoder, randomly
    initialised (decoding speed does not depend on the weights)."""
    from gmpipe.nn.autoencoder import downsampling_factor
    from gmpipe.nn.small_decoder import SmallDecoder, build_small_decoder

    config, autoencoder = params.train_decoder, generator.autoencoder
    return SmallDecoder(build_small_decoder(len(generator.stats.shift), autoencoder.config.out_channels,
                                            downsampling_factor(autoencoder), config.width, config.blocks,
                                            config.full_resolution_blocks), generator.stats).eval()


def load_models(root: Path | None, preset: str, params) -> tuple[object, object, dict, object, bool, list[str]]:
    """(teacher, student, the teacher's settings, small decoder, whether the decoder is trained, notes) from ROOT,
    or random networks without ROOT's models."""
    paths = Paths(root) if root is not None else None
    student_dir = paths.student / STUDENT if paths else None
    if paths is None or not all(p.is_dir() for p in (paths.ldm, paths.vae, student_dir)):
        where = f"{paths.ldm}, {paths.vae} or {student_dir} not found: " if paths else ""
        network = random_generator(preset)
        return (network, network, {}, untrained_small_decoder(network, params), False,
                [f"{where}randomly initialised '{preset}' DiT (teacher: its sampling defaults; student: the same "
                 "network, 1 step, w = 0) and demo autoencoder; untrained small decoder; no FD"])
    from gmpipe.generator import load_decoder_for

    teacher, student, teacher_settings = trained_pair(paths, student_dir, params.evaluate)
    trained = paths.decoder.is_dir()
    small = load_decoder_for(paths.decoder, paths.vae) if trained else untrained_small_decoder(student, params)
    notes = [f"teacher {paths.ldm}, student {student_dir}, small decoder "
             + (str(paths.decoder) if trained else f"untrained ({paths.decoder} not found): no FD")]
    return teacher, student, teacher_settings, small, trained, notes


def trained_pair(paths: Paths, student_dir: Path, ev: EvaluateConfig) -> tuple[object, object, dict]:
    """(teacher, student, the teacher's settings) as ``evaluate`` measures them end to end: both generating and
    decoding at ``evaluate.precision``, the teacher at the student's folded w."""
    from gmpipe.distill.student import read_student_info
    from gmpipe.generator import load_generator

    teacher = load_generator(paths.ldm, autoencoder=paths.vae, precision=ev.precision)
    student = load_generator(student_dir, autoencoder=paths.vae, missing_stage="distill", precision=ev.precision)
    return teacher, student, {"guidance": read_student_info(student_dir).guidance_folded}


def run(size: str = "full", root: Path | None = None) -> dict:
    from gmpipe.stages import evaluate

    s = SIZES[size]
    source = params_file(root)
    params = load_params(source)
    ev = params.evaluate
    n, teacher_n = s["images"] or ev.n_samples, s["teacher_images"] or ev.batch_size
    batch = min(ev.batch_size, n)
    teacher, student, teacher_settings, small, trained, notes = load_models(root, s["preset"], params)
    student_settings = {"steps": 1} if student is not teacher else {"steps": 1, "guidance": 0.0}
    labels = evaluate.balanced_labels(n, len(student.conditioning.rows())) if student.conditioning.conditional else None
    seeds = seed_block(ev.seed, evaluate.HEADLINE_SEEDS, n)  # the seeds and labels of evaluate's family-table rows
    images: dict[str, np.ndarray] = {}

    def case(name: str, generator, decoder, count: int, settings: dict):
        def timed() -> float:
            found, speed = end_to_end.timed_images(generator, decoder, None if labels is None else labels[:count],
                                                   list(seeds[:count]), batch, **settings)
            images[name] = found
            return speed

        return timed

    cases = {"teacher_full_decoder": case("teacher_full_decoder", teacher, None, teacher_n, teacher_settings),
             "teacher_small_decoder": case("teacher_small_decoder", teacher, small, teacher_n, teacher_settings),
             "student_full_decoder": case("student_full_decoder", student, None, n, student_settings),
             "student_small_decoder": case("student_small_decoder", student, small, n, student_settings)}
    speeds = interleave(cases, s["rounds"])
    per_image = {name: [1 / v for v in values] for name, values in speeds.items()}  # seconds per image
    section = Section("one_step_decoding", f"One-step generation end to end: {n} student images, {teacher_n} teacher "
                      f"images, batch {batch}", s["rounds"],
                      ["case", "images", "images/s", "speed vs guided teacher + autoencoder decoder",
                       "FD-EffNetLite0"], [])
    paths = Paths(root) if root is not None else None
    fd: dict[str, float] = {}
    if trained and paths.prepared.is_dir():
        fd_of = fd_against_test_images(paths, ev, n)
        fd = {name: fd_of(images[name]) for name in ("student_full_decoder", "student_small_decoder")}
    elif trained:
        notes.append(f"{paths.prepared} not found: no FD")
    for name, label in CASES.items():
        section.rows.append([label, teacher_n if name.startswith("teacher") else n, median(speeds[name]),
                             speedup(per_image[name], per_image["teacher_full_decoder"]), fd.get(name)])
    ratio = speedup(per_image["student_small_decoder"], per_image["teacher_full_decoder"])
    section.ratios["student + small decoder / teacher + autoencoder decoder"] = ratio
    section.ratios["student + autoencoder decoder / teacher + autoencoder decoder"] = speedup(
        per_image["student_full_decoder"], per_image["teacher_full_decoder"])
    section.ratios["small decoder / autoencoder decoder (student end to end)"] = speedup(
        per_image["student_small_decoder"], per_image["student_full_decoder"])
    if size == "full":  # at quick sizes (a tiny network, a few images) the ratio says nothing about the demo
        section.target(f"student + small decoder / teacher >= {end_to_end.SPEEDUP_TARGET:g}", ratio,
                       ratio >= end_to_end.SPEEDUP_TARGET)
    if fd:
        fd_ratio = fd["student_small_decoder"] / fd["student_full_decoder"]
        section.ratios["FD small decoder / FD autoencoder decoder (same latents)"] = fd_ratio
        section.target(f"FD small / FD autoencoder decoder <= {end_to_end.FD_TARGET_RATIO:g}", fd_ratio,
                       fd_ratio <= end_to_end.FD_TARGET_RATIO)
    section.notes += notes + [f"sizes from {source} (evaluate) unless --quick; teacher at "
                              f"{teacher.resolve_settings(teacher_settings)}; {torch.get_num_threads()} torch "
                              "thread(s); images/s include decoding"]
    return section.finish({CASES[name]: values for name, values in speeds.items()})


def main(argv: list[str]) -> None:
    from gmpipe.generator import load_decoder_for
    from gmpipe.stages import evaluate, train_decoder

    paths = Paths(Path(argv[0]))
    overrides = json.loads(argv[1]) if len(argv) > 1 else {}
    name = argv[2] if len(argv) > 2 else STUDENT
    params = load_params(REPO / "params.yaml")  # the checkout's settings train and measure, not ROOT's (an experiment)
    config = params.train_decoder.replace(**overrides)
    start = time.perf_counter()
    summary = train_decoder.run(config, params.compute.model_copy(update={"threads": 2}), paths)
    print(f"train_decoder: {time.perf_counter() - start:.1f} s wall", json.dumps(summary["metrics"]), flush=True)

    torch.set_num_threads(2)
    ev = params.evaluate
    n = ev.n_samples
    fd_of = fd_against_test_images(paths, ev, n)
    teacher, student, teacher_settings = trained_pair(paths, paths.student / name, ev)
    labels = evaluate.balanced_labels(n, len(student.conditioning.rows())) if student.conditioning.conditional else None
    seeds = seed_block(ev.seed, evaluate.HEADLINE_SEEDS, n)
    full, _ = student.generate(labels, seeds, batch_size=ev.batch_size, steps=1)
    figures, _ = end_to_end.measure_end_to_end(
        teacher, student, load_decoder_for(paths.decoder, paths.vae), teacher_settings=teacher_settings,
        student_settings={"steps": 1}, labels=labels, seeds=seeds, timing_images=ev.batch_size,
        batch_size=ev.batch_size, fd_of=fd_of, fd_full=fd_of(full))
    figures["student"] = name
    print(json.dumps(figures, indent=1))
    print(end_to_end.summary_line(figures))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):  # options only: the bench section
        from bench.command import section_main

        section_main(run)
    else:
        main(sys.argv[1:])
