"""``distill``: few-step students of the trained denoiser, each trained through the shared loop, guidance folded
in at a fixed w. Writes ``models/student/<name>/`` (the layout of ``models/ldm/`` plus ``student.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from gmpipe.artifacts import atomic_dir, atomic_file, read_json, write_json
from gmpipe.config.compute import ComputeConfig
from gmpipe.config.distill import METHOD_KEYS, DistillConfig
from gmpipe.config.loop import RESUMABLE_KEYS
from gmpipe.data.latents import STATS, LatentStats, load_split, load_texts
from gmpipe.distill import halving_schedule, make_couplings, reflow_objective, teacher_sample_fn
from gmpipe.distill.loop_losses import consistency_loss_fn, guidance_loss_fn, progressive_loss_fn, reflow_loss_fn
from gmpipe.distill.reflow import conditions_to_device
from gmpipe.errors import GmpipeError
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_tensors, hash_tree, section_settings
from gmpipe.generate import CONDITIONING, OBJECTIVE, LatentGenerator, save_model_bundle
from gmpipe.paths import Paths
from gmpipe.stages.train_ldm import make_batch_fn
from gmpipe.train.loop import LossStep, make_accelerator, seed_everything, train

SECTIONS = ("distill", "compute")
STUDENT_INFO = "student.json"


def _teacher_callables(teacher):
    denoise = lambda x_t, t, cond: teacher(x_t, t, cond)  # noqa: E731
    null = lambda n, cond: teacher.null_condition(n, like=cond)  # noqa: E731
    return denoise, null


def _fresh_student(weights_dir: Path):
    from gmpipe.nn.denoiser import Denoiser

    return Denoiser.from_pretrained(weights_dir).train()


def teacher_fingerprint(config: DistillConfig, paths: Paths) -> Fingerprint:
    """What every student depends on: the teacher's weights and objective, the latents, and the distill keys shared
    by all methods (loop, guidance weight, time shift; not how long or how often), and the code of this stage."""
    method_specific = [key for keys in METHOD_KEYS.values() for key in keys]
    settings = section_settings("distill", config,
                                exclude=(*RESUMABLE_KEYS, "methods", "consistency_steps", *method_specific))
    denoiser, objective = paths.ldm / "denoiser", paths.ldm / OBJECTIVE
    inputs = {**{paths.name(p): hash_tree(p) for p in (denoiser, objective, paths.latents)}, **code_hashes(__name__)}
    return Fingerprint(settings, inputs)


def method_fingerprint(base: Fingerprint, config: DistillConfig, method: str, **extra) -> Fingerprint:
    """``base`` plus the keys of one distillation method (and e.g. the round of progressive distillation)."""
    return base.with_settings(**{f"distill.{key}": getattr(config, key) for key in METHOD_KEYS[method]}, **extra)


def _train_student(config: DistillConfig, loss, n_items: int, make_batch, checkpoint_dir: Path, student,
                   accelerator, description: str, fingerprint: Fingerprint):
    result = train(config, [LossStep("student", student, loss)], n_items, make_batch, checkpoint_dir,
                   live_dir=checkpoint_dir / "live", ema_of="student", accelerator=accelerator,
                   description=description, fingerprint=fingerprint)
    final_loss = result.history[-1].get("student/loss") if result.history else None
    return result.ema.module.to("cpu").eval(), result.step, final_loss


def run(config: DistillConfig, compute: ComputeConfig, paths: Paths) -> dict:
    seed_everything(config.seed)  # model initialisation depends on the seed, not on what ran before
    teacher_bundle = LatentGenerator.load(paths.ldm)
    teacher, objective = teacher_bundle.denoiser, teacher_bundle.objective
    mode = teacher_bundle.conditioning["mode"]
    split = load_split(paths.latents, "train")
    stats = LatentStats.load(paths.latents / STATS)
    texts = load_texts(paths.latents) if mode == "text" else None
    accelerator = make_accelerator(compute)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    denoise, null = _teacher_callables(teacher)
    w = config.guidance if mode != "none" else 0.0
    make_batch = make_batch_fn(split, stats, texts, mode)
    root = paths.checkpoints / "distill"
    base = teacher_fingerprint(config, paths)
    students: dict[str, dict] = {}

    for method in config.methods:
        if method == "progressive":
            previous, previous_w = None, w
            for n_steps in halving_schedule(config.progressive_start_steps, config.progressive_final_steps):
                student = _fresh_student(paths.ldm / "denoiser")
                if previous is not None:
                    student.load_state_dict(previous.state_dict())
                round_teacher = denoise if previous is None else _teacher_callables(previous.to(accelerator.device))[0]
                loss = progressive_loss_fn(round_teacher, objective, n_steps, w=previous_w, null_condition=null,
                                           shift=config.time_shift)
                # Each round is defined by its own step count and by the exact weights of the round before it.
                fingerprint = method_fingerprint(
                    base, config, "progressive", **{"distill.progressive_round_steps": n_steps},
                ).with_inputs(previous_round=hash_tensors(previous.state_dict()) if previous is not None else "teacher")
                model, trained, final = _train_student(config, loss, len(split), make_batch,
                                                       root / f"progressive-{n_steps}", student, accelerator,
                                                       f"distill progressive {n_steps}-step", fingerprint)
                model.requires_grad_(False)
                students[f"progressive-{n_steps}step"] = {
                    "model": model, "method": "progressive", "steps": [n_steps], "sampler": "ddim",
                    "objective": objective, "train_steps": trained, "final_loss": final}
                previous, previous_w = model, 0.0  # later rounds distill the previous student, already guided
        elif method == "reflow":
            couplings = _couplings(config, paths, root, denoise, null, objective, split, stats, texts, mode, w,
                                   method_fingerprint(base, config, "reflow"), accelerator)

            def coupling_batch(index, device, couplings=couplings):
                z, x, cond = couplings.batch(index)
                return z.to(device), x.to(device), conditions_to_device(cond, device)

            student = _fresh_student(paths.ldm / "denoiser")
            model, trained, final = _train_student(config, reflow_loss_fn(), len(couplings), coupling_batch,
                                                   root / "reflow", student, accelerator, "distill reflow",
                                                   method_fingerprint(base, config, "reflow"))
            students["reflow"] = {"model": model, "method": "reflow", "steps": [1, 2, 4], "sampler": "euler",
                                  "objective": reflow_objective(), "train_steps": trained, "final_loss": final}
        elif method == "consistency":
            student = _fresh_student(paths.ldm / "denoiser")
            loss = consistency_loss_fn(denoise, objective, config.consistency_intervals, w=w, null_condition=null,
                                       shift=config.time_shift)
            model, trained, final = _train_student(config, loss, len(split), make_batch, root / "consistency",
                                                   student, accelerator, "distill consistency",
                                                   method_fingerprint(base, config, "consistency"))
            students["consistency"] = {"model": model, "method": "consistency", "steps": config.consistency_steps,
                                       "sampler": "consistency", "objective": objective, "train_steps": trained,
                                       "final_loss": final}
        elif method == "guidance":
            student = _fresh_student(paths.ldm / "denoiser")
            loss = guidance_loss_fn(denoise, objective, w=w, null_condition=null)
            model, trained, final = _train_student(config, loss, len(split), make_batch, root / "guidance",
                                                   student, accelerator, "distill guidance",
                                                   method_fingerprint(base, config, "guidance"))
            steps = teacher_bundle.sampling["steps"]
            students["guidance"] = {"model": model, "method": "guidance", "steps": [steps],
                                    "sampler": teacher_bundle.sampling["sampler"], "objective": objective,
                                    "train_steps": trained, "final_loss": final}
    if not accelerator.is_main_process:
        return {}
    return _write_students(paths, config, teacher_bundle, students, w)


COUPLINGS_PREFIX = "reflow-couplings-"


def _couplings(config, paths, root, denoise, null, objective, split, stats, texts, mode, w, fingerprint: Fingerprint,
               accelerator):
    """Teacher ODE couplings (noise, sample) for reflow, cached beside the checkpoints under the fingerprint of
    everything that made them (teacher, latents, guidance, sampler, steps, shift, seed, count).

    The main process makes and writes them (other caches are removed); the other ranks wait, then read the file.
    """
    from gmpipe.distill.reflow import Couplings

    cache = root / f"{COUPLINGS_PREFIX}{fingerprint.digest[:16]}.safetensors"
    n = min(config.reflow_pairs, len(split))
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(config.seed))[:n]
    _, cond = make_batch_fn(split, stats, texts, mode)(index, "cpu")
    if accelerator.is_main_process and not _read_couplings(cache, fingerprint):
        for old in root.glob(f"{COUPLINGS_PREFIX}*"):
            old.unlink()
        sample = teacher_sample_fn(denoise, objective, config.reflow_teacher_steps, sampler=config.reflow_sampler,
                                   w=w, null_condition=null, shift=config.time_shift)
        shape = tuple(split.mean.shape[1:])
        made = make_couplings(sample, n, shape, seed=config.seed, cond=cond, batch_size=512,
                              device=accelerator.device)
        with atomic_file(cache, "wb") as handle:
            handle.write(save(
                {"noise": made.noise.contiguous(), "data": made.data.contiguous()},
                metadata={"fingerprint": json.dumps(fingerprint.to_dict())},
            ))
    accelerator.wait_for_everyone()
    saved = _read_couplings(cache, fingerprint)
    if saved is None:
        raise GmpipeError(f"{cache}: the reflow couplings were not written (or do not match this run)")
    return Couplings(noise=saved["noise"], data=saved["data"], cond=cond, seed=config.seed)


def _read_couplings(cache: Path, fingerprint: Fingerprint) -> dict | None:
    """The cached couplings when the file is intact and was made under ``fingerprint``; None otherwise."""
    if not cache.is_file():
        return None
    try:
        with safe_open(cache, "pt") as handle:
            stored = Fingerprint.from_dict(json.loads((handle.metadata() or {}).get("fingerprint", "null")))
            if stored is None or stored.digest != fingerprint.digest:
                return None
            return {key: handle.get_tensor(key) for key in ("noise", "data")}
    except Exception:  # a truncated or foreign file is remade, never trusted
        return None


def _write_students(paths: Paths, config: DistillConfig, teacher_bundle, students: dict, w: float) -> dict:
    if not students:
        raise GmpipeError("distill.methods: nothing was distilled")
    conditioning = read_json(paths.ldm / CONDITIONING, "train_ldm")
    table = {}
    with atomic_dir(paths.student) as out:
        for name, student in students.items():
            folder = out / name
            folder.mkdir()
            student["model"].save_pretrained(folder / "denoiser")
            # Students are sampled on the shifted grid they were distilled on.
            sampling = {"sampler": student["sampler"], "steps": student["steps"][0], "guidance": 0.0,
                        "shift": config.time_shift}
            save_model_bundle(folder, student["objective"], paths.latents / STATS, conditioning, sampling)
            info = {"method": student["method"], "steps": student["steps"], "guidance_folded": w,
                    "time_shift": config.time_shift,
                    "nfe_per_step": 1, "train_steps": student["train_steps"], "final_loss": student["final_loss"],
                    "teacher": str(paths.ldm)}
            (folder / STUDENT_INFO).write_text(json.dumps(info, indent=2))
            table[name] = {k: info[k] for k in ("method", "steps", "guidance_folded", "train_steps", "final_loss")}
    write_json(paths.reports / "distill" / "metrics.json", table)
    lines = ["| student | method | steps | NFE per image | w folded | train steps | final loss |",
             "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4g}"
        lines.append(f"| {name} | {row['method']} | {row['steps']} | {row['steps']} | {w:g} | "
                     f"{row['train_steps']} | {loss} |")
    teacher_nfe = teacher_bundle.sampling["steps"] * (2 if w else 1)
    lines += ["", f"Teacher: {teacher_bundle.sampling['sampler']}, {teacher_bundle.sampling['steps']} steps, "
                  f"w = {w:g}: {teacher_nfe} network evaluations per image. Quality is measured by `evaluate`."]
    return {"read": [str(paths.ldm), str(paths.latents)], "wrote": [str(paths.student)],
            "students": list(table), "markdown": "\n".join(lines)}
