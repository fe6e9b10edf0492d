"""``distill``: few-step students of the trained denoiser, each trained through the shared loop, guidance folded
in at a fixed w; one loop over the configured methods (``gmpipe.distill.methods``). Writes
``models/student/<name>/`` (the latent diffusion layout of ``models/ldm/`` plus ``student.json``; a diffusers pipeline
folder too, with the teacher's copy of the autoencoder)."""

from __future__ import annotations

from gmpipe.artifacts import atomic_dir, write_json
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.distill import DistillConfig
from gmpipe.config.loop import resumable_keys
from gmpipe.data.latents import STATS, LatentStats, load_split, make_batch_fn
from gmpipe.distill.session import DistillSession, Student
from gmpipe.distill.student import write_student_info
from gmpipe.errors import GmpipeError
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tree, section_settings
from gmpipe.latent_diffusion import OBJECTIVE, WEIGHTS, LatentDiffusion
from gmpipe.paths import Paths
from gmpipe.pipelines.latent_diffusion import VAE, save_pipeline_files
from gmpipe.precision import resolve_precision
from gmpipe.registry import DISTILL_METHODS
from gmpipe.train.loop import make_accelerator, seed_everything

SECTIONS = ("distill", "compute")


def teacher_fingerprint(config: DistillConfig, paths: Paths) -> Fingerprint:
    """What every student depends on: the teacher's weights and objective, the latents, and the distill keys shared
    by all methods (loop, guidance weight, time shift; not how often, nor how long under a constant learning rate),
    and the code of this stage. A method's own ``method_loop`` keys are in its students' fingerprints only
    (``DistillSession.fingerprint``)."""
    methods = [DISTILL_METHODS[name] for name in DISTILL_METHODS]
    method_keys = [key for method in methods for key in (*method.keys, *method.sampling_keys)]
    settings = section_settings("distill", config, exclude=(*resumable_keys(config.loop), "methods", "method_loop",
                                                            *method_keys))
    denoiser, objective = paths.ldm / WEIGHTS, paths.ldm / OBJECTIVE
    inputs = {**{paths.name(p): hash_tree(p) for p in (denoiser, objective, paths.latents)}, **code_hashes(__name__)}
    return Fingerprint(settings, inputs)


def run(config: DistillConfig, compute: ComputeConfig, paths: Paths) -> dict:
    seed_everything(config.loop.seed)  # model initialisation depends on the seed, not on what ran before
    teacher = LatentDiffusion.load(paths.ldm, "train_ldm")
    split = load_split(paths.latents, "train")
    conditions = teacher.conditioning.training_conditions(split, paths.latents)
    accelerator = make_accelerator(compute)
    # auto resolved here, so the couplings' cache key and the students' fingerprints name what ran
    config = config.replace(reflow_precision=resolve_precision(config.reflow_precision, accelerator.device,
                                                               "distill.reflow_precision"))
    teacher.denoiser.to(accelerator.device).eval().requires_grad_(False)
    session = DistillSession(
        config=config, teacher=teacher, teacher_folder=paths.ldm,
        w=config.guidance if teacher.conditioning.conditional else 0.0,
        make_batch=make_batch_fn(split, LatentStats.load(paths.latents / STATS), conditions),
        conditions=conditions, n_items=len(split), checkpoints=paths.checkpoints / "distill",
        base=teacher_fingerprint(config, paths), accelerator=accelerator,
    )
    students = [student for name in config.methods for student in DISTILL_METHODS[name]().distill(session)]
    if not accelerator.is_main_process:
        return {}
    return _write_students(paths, config, teacher, students, session.w, accelerator.mixed_precision)


def _write_students(paths: Paths, config: DistillConfig, teacher: LatentDiffusion, students: list[Student],
                    w: float, mixed_precision: str) -> dict:
    if not students:
        raise GmpipeError("distill.methods: nothing was distilled")
    table = {}
    with atomic_dir(paths.student) as out:
        for student in students:
            folder = out / student.name
            folder.mkdir()
            # Students are sampled on the shifted grid they were distilled on, with the guidance folded in.
            settings = {"sampler": student.sampler, "steps": student.steps[0], "guidance": 0.0,
                        "shift": config.time_shift}
            bundle = LatentDiffusion(student.model, student.objective, teacher.stats, teacher.conditioning, settings)
            bundle.save(folder, "distill", stats_file=paths.latents / STATS)
            save_pipeline_files(folder, bundle, "distill", autoencoder=paths.ldm / VAE, autoencoder_stage="train_ldm")
            info = {"method": student.method, "steps": student.steps, "guidance_folded": w,
                    "time_shift": config.time_shift, "nfe_per_step": 1, "train_steps": student.train_steps,
                    "final_loss": student.final_loss, "teacher": str(paths.ldm)}
            write_student_info(folder, **info)
            table[student.name] = {**{k: info[k] for k in ("method", "steps", "guidance_folded", "train_steps",
                                                           "final_loss")}, "mixed_precision": mixed_precision}
    write_json(paths.reports / "distill" / "metrics.json", table)
    lines = ["| student | method | steps | NFE per image | w folded | train steps | final loss |",
             "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4g}"
        lines.append(f"| {name} | {row['method']} | {row['steps']} | {row['steps']} | {w:g} | "
                     f"{row['train_steps']} | {loss} |")
    sampling = teacher.settings
    teacher_nfe = sampling["steps"] * (2 if w else 1)
    lines += ["", f"Teacher: {sampling['sampler']}, {sampling['steps']} steps, w = {w:g}: {teacher_nfe} network "
                  "evaluations per image. Quality is measured by `evaluate`."]
    return {"read": [str(paths.ldm), str(paths.latents)], "wrote": [str(paths.student)],
            "students": list(table), "markdown": "\n".join(lines)}
