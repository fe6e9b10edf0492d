"""4. Sampling: images/s of the 50-step guided teacher (Euler, w = 1: 100 NFE) vs 1, 2 and 4 steps of the same
network (same guidance), and of every distilled student under ``ROOT/models/student/*/`` (with its own stored
settings), decode included and excluded, generating at ROOT/params.yaml's ``evaluate.precision`` as ``evaluate`` does.

Every model is a ``gmpipe.generator.Generator``: the cases call ``generate`` (decoded uint8 images) and, to time the
network alone, the same call without the autoencoder. Without ``--root`` (or without ``ROOT/models/ldm``) the
network is a randomly initialised train_ldm DiT and the demo autoencoder: speed does not depend on the weights.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from bench.measure import interleave, median, speedup
from bench.report import Section
from bench.workloads import CONDITIONING, LATENT_SHAPE, demo_autoencoder, ldm_config, params_file
from gmpipe.config.params import load_params
from gmpipe.data.latents import LatentStats
from gmpipe.diffusion import Objective
from gmpipe.errors import GmpipeError
from gmpipe.generator import Generator, load_generator
from gmpipe.latent_diffusion import LatentDiffusion

SIZES = {"full": dict(preset="small", images=200, rounds=3), "quick": dict(preset="tiny", images=8, rounds=2)}
TEACHER = dict(sampler="euler", steps=50, guidance=1.0)
FEW_STEPS = (1, 2, 4)


def random_generator(preset: str) -> LatentDiffusion:
    """A class-conditional model with random weights, the teacher's sampling defaults and unit latent stats."""
    config = ldm_config(preset, batch_size=1)
    channels = LATENT_SHAPE[0]
    return LatentDiffusion(CONDITIONING.make_denoiser(LATENT_SHAPE, preset).eval(),
                           Objective.from_config(config.objective.objective_config()),
                           LatentStats((0.0,) * channels, (1.0,) * channels), CONDITIONING, dict(TEACHER),
                           autoencoder=demo_autoencoder())


def requests(generator: Generator, n: int) -> list[int] | None:
    """n requests cycling over the classes (their captions for a text model); None for an unconditional model."""
    if not generator.conditioning.conditional:
        return None
    return [i % len(generator.conditioning.class_names) for i in range(n)]


def without_decoder(generator: Generator) -> Generator:
    """The same model with a decoder that returns its latents: ``generate`` then times the sampling alone."""
    bare = copy.copy(generator)
    bare.decode = lambda latents: latents.clamp(-1, 1)
    return bare


def sampling_case(generator: Generator, n: int, decode: bool, **settings):
    """A case returning the seconds to generate n images (with or without decoding) and the NFE per image."""
    model, asked, seeds = generator if decode else without_decoder(generator), requests(generator, n), list(range(n))

    def case() -> dict[str, float]:
        start = time.perf_counter()
        _, nfe = model.generate(asked, seeds, **settings)
        return {"seconds": time.perf_counter() - start, "nfe": nfe}

    return case


def load_models(root: Path | None, preset: str) -> tuple[Generator, dict[str, Generator], list[str]]:
    """(teacher, {student name: generator}, notes) from ROOT/models, generating at ROOT's ``evaluate.precision`` as
    ``evaluate`` does, or a random teacher (float32) without them."""
    if root is None or not (root / "models" / "ldm").is_dir():
        where = f"{root}/models/ldm not found: " if root is not None else ""
        return random_generator(preset), {}, [f"{where}randomly initialised '{preset}' DiT and demo autoencoder"]
    vae, source = root / "models" / "vae", params_file(root)
    precision = load_params(source).evaluate.precision
    teacher = load_generator(root / "models" / "ldm", autoencoder=vae, precision=precision)
    students, notes = {}, [f"teacher: {root / 'models' / 'ldm'}; generating at {teacher.precision} "
                           f"(evaluate.precision of {source})"]
    for folder in sorted((root / "models" / "student").glob("*/")):
        try:
            students[f"student {folder.name}"] = load_generator(folder, autoencoder=vae, missing_stage="distill",
                                                                precision=precision)
        except (GmpipeError, FileNotFoundError, KeyError, ValueError) as exc:
            notes.append(f"student {folder.name}: not loadable ({exc})")
    if not students:
        notes.append(f"no students under {root / 'models' / 'student'}")
    return teacher, students, notes


def run(size: str = "full", root: Path | None = None) -> dict:
    s = SIZES[size]
    n = s["images"]
    teacher, students, notes = load_models(root, s["preset"])
    models = {"teacher, 50 steps, w=1": (teacher, TEACHER)}
    for steps in FEW_STEPS:
        models[f"same network, {steps} step{'s' if steps > 1 else ''}, w=1"] = (teacher, {**TEACHER, "steps": steps})
    for name, student in students.items():
        described = ", ".join(f"{key}={value}" for key, value in student.settings.items())
        models[f"{name} ({described})"] = (student, {})
    # Without and with decoding are separate cases, interleaved with all the others (no case runs warm after its twin).
    cases = {(name, decode): sampling_case(model, n, decode, **settings)
             for name, (model, settings) in models.items() for decode in (False, True)}
    results = interleave(cases, s["rounds"])

    def seconds(name, decode):
        return [r["seconds"] for r in results[(name, decode)]]

    teacher_name = next(iter(models))
    section = Section(
        "sampling", f"Sampling: {n} images per call, Euler, classifier-free guidance in one 2B batch",
        s["rounds"], ["case", "NFE", "img/s (no decode)", "img/s (with decode)", "speed-up (no decode)",
                      "speed-up (with decode)"], [])
    for name in models:
        row = [name, results[(name, True)][0]["nfe"]]
        row += [n / median(seconds(name, decode)) for decode in (False, True)]
        row += [speedup(seconds(name, decode), seconds(teacher_name, decode)) for decode in (False, True)]
        section.rows.append(row)
        if name != teacher_name:
            short = name.split(" (")[0].split(", w=")[0]
            section.ratios[f"{short} / teacher (no decode)"] = row[4]
            section.ratios[f"{short} / teacher (with decode)"] = row[5]
    # Each case's median with decoding minus without, the median over the cases: the teacher's alone is the difference
    # of two ~2.5 s medians, whose spread on a shared machine is larger than the decoding itself.
    decode_ms = median([median(seconds(name, True)) - median(seconds(name, False)) for name in models]) * 1e3
    section.notes += notes + [f"decoding {n} images takes about {decode_ms:.0f} ms (per case, median with decode minus "
                              f"without; the median over the {len(models)} cases)"]
    return section.finish({f"{name} ({'with' if decode else 'no'} decode)": rows for (name, decode), rows
                           in results.items()})


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
