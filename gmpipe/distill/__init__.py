"""Distillation: a trained (guided) denoiser into a student that samples in a few network evaluations.

The math of each method, one module each (every one has a per-sample loss (B,) and a `loop_losses` adapter for
the shared training loop's LossStep):

    progressive            Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student with N DDIM
                           steps matches its teacher's 2N; rounds halve N (`halving_schedule`). Any (schedule,
                           target) through the 2x2 conversions. Student: teacher's objective, sampled with
                           `ddim` on `time_grid(N, shift)`.
    reflow                 Rectified-flow reflow (Liu et al. 2022): a velocity student on the straight paths
                           between the teacher's (noise, sample) couplings. Student: `reflow_objective()`
                           (rectified_flow + velocity, whatever the teacher's), sampled with `euler` in 1-2 steps.
    guidance_distillation  Guidance distillation at a fixed w (Meng et al. 2023, stage one): a plain
                           conditional student matches the guided prediction. Student: teacher's objective
                           and sampler, half the network evaluations.
    consistency            Consistency distillation (Song et al. 2023, Algorithm 2; LCM, Luo et al. 2023):
                           the teacher's DDIM steps as the ODE solver. Student: teacher's objective, sampled with
                           the "consistency" sampler (gmpipe.diffusion.consistency).

Guidance: a teacher guided at a fixed w (`teacher.guided_teacher_fn`) distills into a plain conditional
student of the same architecture, 1 network evaluation per step (the student has no w input).

How the distill stage runs them: `session` (what every method gets and returns), `methods` (one DistillMethod per
method, registered in gmpipe.registry.DISTILL_METHODS), `student` (student.json). Shared modules: `teacher`
(binding cond, null cond and w into a model_fn(x_t, t)) and `loop_losses` (loss(batch, step, context, modules)
factories). Time convention and shapes: gmpipe.diffusion.
"""
