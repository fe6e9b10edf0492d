"""4. Sampling: images/s of the 50-step guided teacher (Euler, w = 1: 100 NFE) vs 1, 2 and 4 steps of the same
network (same guidance), and of every distilled student under ``ROOT/models/student/*/`` (with its own stored
sampler, steps and guidance), decode included and excluded.

Without ``--root`` (or without ``ROOT/models/ldm``) the network is a randomly initialised train_ldm DiT and the
demo autoencoder: speed does not depend on the weights.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.measure import interleave, median, speedup
from bench.report import Section
from bench.workloads import LATENT_SHAPE, demo_autoencoder, ldm_config
from gmpipe.data.fashion_mnist import CLASS_NAMES
from gmpipe.data.latents import LatentStats
from gmpipe.diffusion import Objective
from gmpipe.errors import GmpipeError
from gmpipe.generate import LatentGenerator
from gmpipe.stages.train_ldm import build_denoiser

SIZES = {"full": dict(preset="small", images=200, rounds=3), "quick": dict(preset="tiny", images=8, rounds=2)}
TEACHER = dict(sampler="euler", steps=50, guidance=1.0)
FEW_STEPS = (1, 2, 4)


def random_generator(preset: str) -> LatentGenerator:
    """A class-conditional generator with random weights, the teacher's sampling defaults and unit latent stats."""
    config = ldm_config(preset, batch_size=1)
    channels = LATENT_SHAPE[0]
    return LatentGenerator(
        denoiser=build_denoiser(config, LATENT_SHAPE, len(CLASS_NAMES), text_dim=None).eval(),
        objective=Objective.from_config(config.objective_config()),
        stats=LatentStats((0.0,) * channels, (1.0,) * channels), vae=demo_autoencoder(),
        conditioning={"mode": "class", "class_names": list(CLASS_NAMES)}, sampling=dict(TEACHER),
        latent_shape=LATENT_SHAPE)


def condition(generator: LatentGenerator, n: int):
    """n conditions cycling over the classes (or their default captions); None for an unconditional model."""
    mode = generator.conditioning["mode"]
    names = generator.conditioning.get("class_names") or ["item"]
    if mode == "class":
        return generator.condition(labels=[i % len(names) for i in range(n)])
    if mode == "text":
        return generator.condition(prompts=[f"a photo of a {names[i % len(names)].lower()}" for i in range(n)])
    return None


def sampling_case(generator: LatentGenerator, cond, n: int, **sampling):
    """A case returning the seconds to sample n latents and to decode them, and the NFE per image."""

    def case() -> dict[str, float]:
        start = time.perf_counter()
        latents, nfe = generator.sample_latents(cond, n, **sampling)
        sampled = time.perf_counter()
        generator.decode(latents)
        return {"sample": sampled - start, "decode": time.perf_counter() - sampled, "nfe": nfe}

    return case


def load_models(root: Path | None, preset: str) -> tuple[LatentGenerator, dict[str, LatentGenerator], list[str]]:
    """(teacher, {student name: generator}, notes) from ROOT/models, or a random teacher without one."""
    if root is None or not (root / "models" / "ldm" / "objective.json").is_file():
        where = f"{root}/models/ldm not found: " if root is not None else ""
        return random_generator(preset), {}, [f"{where}randomly initialised '{preset}' DiT and demo autoencoder"]
    vae = root / "models" / "vae"
    teacher = LatentGenerator.load(root / "models" / "ldm", vae)
    students, notes = {}, [f"teacher: {root / 'models' / 'ldm'}"]
    for folder in sorted((root / "models" / "student").glob("*/")):
        try:
            students[f"student {folder.name}"] = LatentGenerator.load(folder, vae)
        except (GmpipeError, FileNotFoundError, KeyError, ValueError) as exc:
            notes.append(f"student {folder.name}: not loadable ({exc})")
    if not students:
        notes.append(f"no students under {root / 'models' / 'student'}")
    return teacher, students, notes


def run(size: str = "full", root: Path | None = None) -> dict:
    s = SIZES[size]
    n = s["images"]
    teacher, students, notes = load_models(root, s["preset"])
    cond = condition(teacher, n)
    cases = {"teacher, 50 steps, w=1": sampling_case(teacher, cond, n, **TEACHER)}
    for steps in FEW_STEPS:
        cases[f"same network, {steps} step{'s' if steps > 1 else ''}, w=1"] = sampling_case(
            teacher, cond, n, **{**TEACHER, "steps": steps})
    for name, student in students.items():
        cases[f"{name} ({student.sampling['sampler']}, {student.sampling['steps']} steps, "
              f"w={student.sampling['guidance']})"] = sampling_case(student, condition(student, n), n)
    results = interleave(cases, s["rounds"])

    def seconds(name, decode):
        return [r["sample"] + (r["decode"] if decode else 0.0) for r in results[name]]

    teacher_name = next(iter(cases))
    section = Section(
        "sampling", f"Sampling: {n} images per call, Euler, classifier-free guidance in one 2B batch",
        s["rounds"], ["case", "NFE", "img/s (no decode)", "img/s (with decode)", "speed-up (no decode)",
                      "speed-up (with decode)"], [])
    for name in cases:
        row = [name, results[name][0]["nfe"]]
        row += [n / median(seconds(name, decode)) for decode in (False, True)]
        row += [speedup(seconds(name, decode), seconds(teacher_name, decode)) for decode in (False, True)]
        section.rows.append(row)
        if name != teacher_name:
            short = name.split(" (")[0].split(", w=")[0]
            section.ratios[f"{short} / teacher (no decode)"] = row[4]
            section.ratios[f"{short} / teacher (with decode)"] = row[5]
    decode_ms = median([r["decode"] for r in results[teacher_name]]) * 1e3
    section.notes += notes + [f"decoding {n} images takes {decode_ms:.0f} ms"]
    return section.finish(results)


if __name__ == "__main__":
    from bench.run_all import section_main

    section_main(run)
