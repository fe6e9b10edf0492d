"""The distillation methods as the distill stage runs them, one :class:`~gmpipe.distill.session.DistillMethod`
each (registered in ``gmpipe.registry.DISTILL_METHODS``). The math of each is its own module; here is only what
students a method trains, from what, and how they are sampled.

Every student is a plain conditional copy of the teacher's architecture, initialised from the teacher (or, for
progressive rounds after the first, from the previous student), distilled from the teacher guided at the fixed
weight ``session.w``: one network evaluation per sampling step instead of two.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from gmpipe.artifacts import atomic_file
from gmpipe.batching import to_device
from gmpipe.distill.loop_losses import consistency_loss_fn, guidance_loss_fn, progressive_loss_fn, reflow_loss_fn
from gmpipe.distill.progressive import halving_schedule
from gmpipe.distill.reflow import Couplings, make_couplings, reflow_objective, teacher_sample_fn
from gmpipe.distill.session import DistillMethod, DistillSession, Student
from gmpipe.errors import GmpipeError
from gmpipe.fingerprint import Fingerprint, hash_tensors
from gmpipe.precision import bf16_autocast


class ProgressiveDistillation(DistillMethod):
    """Rounds of students with halving step counts, each sampled with DDIM on the (shifted) grid it was trained
    on; the first round learns from the guided teacher, every later round from the previous student."""

    keys = ("progressive_start_steps", "progressive_final_steps")
    paper = "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models"

    def distill(self, session: DistillSession) -> list[Student]:
        config, students = session.config, []
        previous, previous_w = None, session.w
        for n_steps in halving_schedule(config.progressive_start_steps, config.progressive_final_steps):
            student = session.fresh_student()
            if previous is not None:
                student.load_state_dict(previous.state_dict())
            teacher = session.denoise if previous is None else previous.to(session.accelerator.device)
            loss = progressive_loss_fn(teacher, session.objective, n_steps, w=previous_w, null_condition=session.null,
                                       shift=config.time_shift)
            # Each round is defined by its own step count and by the exact weights of the round before it.
            fingerprint = session.fingerprint(self, **{"distill.progressive_round_steps": n_steps}).with_inputs(
                previous_round=hash_tensors(previous.state_dict()) if previous is not None else "teacher")
            model, trained, final = session.train(self, student, loss, f"progressive-{n_steps}",
                                                  f"distill progressive {n_steps}-step", fingerprint)
            model.requires_grad_(False)
            students.append(Student(f"progressive-{n_steps}step", model, "progressive", [n_steps], "ddim",
                                    session.objective, trained, final))
            previous, previous_w = model, 0.0  # later rounds distill the previous student, already guided
        return students


class Reflow(DistillMethod):
    """A rectified-flow velocity student on the teacher's own (noise, sample) couplings, sampled with Euler in 1,
    2 or 4 steps."""

    keys = ("reflow_pairs", "reflow_sampler", "reflow_teacher_steps", "reflow_precision")
    paper = "Liu et al. 2022, Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow"

    def distill(self, session: DistillSession) -> list[Student]:
        fingerprint = session.fingerprint(self)
        couplings = cached_couplings(session, fingerprint)

        def coupling_batch(index, device):
            z, x, cond = couplings.batch(index)
            return z.to(device), x.to(device), to_device(cond, device)

        model, trained, final = session.train(self, session.fresh_student(), reflow_loss_fn(), "reflow",
                                              "distill reflow", fingerprint, make_batch=coupling_batch,
                                              n_items=len(couplings))
        return [Student("reflow", model, "reflow", [1, 2, 4], "euler", reflow_objective(), trained, final)]


class ConsistencyDistillation(DistillMethod):
    """A consistency student (the teacher's DDIM steps as the ODE solver), sampled with the multistep consistency
    sampler at ``consistency_steps``."""

    keys = ("consistency_intervals",)
    sampling_keys = ("consistency_steps",)
    paper = "Song et al. 2023, Consistency Models; Luo et al. 2023, Latent Consistency Models"

    def distill(self, session: DistillSession) -> list[Student]:
        config = session.config
        loss = consistency_loss_fn(session.denoise, session.objective, config.consistency_intervals, w=session.w,
                                   null_condition=session.null, shift=config.time_shift)
        model, trained, final = session.train(self, session.fresh_student(), loss, "consistency", "distill consistency",
                                              session.fingerprint(self))
        return [Student("consistency", model, "consistency", list(config.consistency_steps), "consistency",
                        session.objective, trained, final)]


class GuidanceDistillation(DistillMethod):
    """A plain conditional student that matches the guided teacher, sampled with the teacher's sampler and steps at
    half the network evaluations."""

    paper = "Meng et al. 2023, On Distillation of Guided Diffusion Models"

    def distill(self, session: DistillSession) -> list[Student]:
        loss = guidance_loss_fn(session.denoise, session.objective, w=session.w, null_condition=session.null)
        model, trained, final = session.train(self, session.fresh_student(), loss, "guidance", "distill guidance",
                                              session.fingerprint(self))
        teacher = session.teacher.settings
        return [Student("guidance", model, "guidance", [teacher["steps"]], teacher["sampler"], session.objective,
                        trained, final)]


COUPLINGS_PREFIX = "reflow-couplings-"


def cached_couplings(session: DistillSession, fingerprint: Fingerprint) -> Couplings:
    """Teacher ODE couplings (noise, sample) for reflow, cached beside the checkpoints under the fingerprint of
    everything that made them (teacher, latents, guidance, sampler, steps, shift, seed, count).

    The main process makes and writes them (other caches are removed); the other ranks wait, then read the file.
    """
    config, accelerator, root = session.config, session.accelerator, session.checkpoints
    cache = root / f"{COUPLINGS_PREFIX}{fingerprint.digest[:16]}.safetensors"
    n = min(config.reflow_pairs, session.n_items)
    seed = config.loop.seed
    index = torch.randperm(session.n_items, generator=torch.Generator().manual_seed(seed))[:n]
    cond = session.conditions(index)
    if accelerator.is_main_process and not _read_couplings(cache, fingerprint):
        for old in root.glob(f"{COUPLINGS_PREFIX}*"):
            old.unlink()
        sample = teacher_sample_fn(session.denoise, session.objective, config.reflow_teacher_steps,
                                   sampler=config.reflow_sampler, w=session.w, null_condition=session.null,
                                   shift=config.time_shift)
        # bf16: the teacher's network evaluations under bfloat16 autocast (the sampler's state stays float32)
        with bf16_autocast(accelerator.device, config.reflow_precision == "bf16"):
            made = make_couplings(sample, n, session.latent_shape, seed=seed, cond=cond, batch_size=512,
                                  device=accelerator.device)
        with atomic_file(cache, "wb") as handle:
            handle.write(save({"noise": made.noise.contiguous(), "data": made.data.contiguous()},
                              metadata={"fingerprint": json.dumps(fingerprint.to_dict())}))
    accelerator.wait_for_everyone()
    saved = _read_couplings(cache, fingerprint)
    if saved is None:
        raise GmpipeError(f"{cache}: the reflow couplings were not written (or do not match this run)")
    return Couplings(noise=saved["noise"], data=saved["data"], cond=cond, seed=seed)


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
