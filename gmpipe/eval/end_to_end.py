"""One-step generation end to end: what a one-step student costs and loses once its latents are decoded, with the
autoencoder's decoder and with the small decoder distilled from it (``train_decoder``).

A one-step student makes latents about a hundred times faster than the guided many-step teacher, so the decoder
then dominates its images per second. The measurement decodes the *same* latents (same seeds, labels and n as the
student's family-table row) with both decoders, and times teacher and student end to end (sampling + decoding, same
batch size, same threads, one after the other). Targets: the student with the small decoder at least
``SPEEDUP_TARGET`` times the guided teacher's images per second (the teacher with the autoencoder's decoder), and the
FD of its images within ``FD_TARGET_RATIO`` times the FD of the same latents decoded by the autoencoder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

SPEEDUP_TARGET = 30.0
FD_TARGET_RATIO = 1.05
DECODERS = ("full", "small")  # the autoencoder's decoder, the small one


def timed_images(generator, decoder: torch.nn.Module | None, labels: Sequence[int] | None, seeds: Sequence[int],
                 batch_size: int, **settings) -> tuple[np.ndarray, float]:
    """``generator``'s uint8 images (N, C, H, W) decoded by ``decoder`` (None: the autoencoder), and its images per
    second end to end (wall clock)."""
    generator.use_decoder(decoder)
    try:
        start = time.perf_counter()
        images, _ = generator.generate(labels, seeds, batch_size=batch_size, **settings)
        return images, len(seeds) / max(time.perf_counter() - start, 1e-9)
    finally:
        generator.use_decoder(None)


def measure_end_to_end(teacher, student, small_decoder: torch.nn.Module, *, teacher_settings: dict,
                       student_settings: dict, labels: Sequence[int] | None, seeds: Sequence[int], timing_images: int,
                       batch_size: int, fd_of: Callable[[np.ndarray], float],
                       fd_full: float) -> tuple[dict, np.ndarray]:
    """The figures (module docstring) and the student's images decoded by the small decoder.

    The student generates ``seeds`` (n; ``labels`` one per seed, or None) with each decoder, timed; the teacher its
    first ``timing_images`` with each decoder, timed (the guided many-step teacher makes a few hundred images in
    the time the student makes thousands). ``fd_full``: the FD of the student's images of the same latents decoded
    by the autoencoder (its family-table row); ``fd_of`` measures the small decoder's."""
    speed: dict[str, float] = {}
    timed = min(timing_images, len(seeds))
    teacher_labels = None if labels is None else list(labels)[:timed]
    for name, decoder in zip(DECODERS, (None, small_decoder), strict=True):
        _, speed[f"teacher_{name}_decoder"] = timed_images(teacher, decoder, teacher_labels, list(seeds)[:timed],
                                                           batch_size, **teacher_settings)
    _, speed["student_full_decoder"] = timed_images(student, None, labels, seeds, batch_size, **student_settings)
    images, speed["student_small_decoder"] = timed_images(student, small_decoder, labels, seeds, batch_size,
                                                          **student_settings)
    fd_small = fd_of(images)
    speedup = speed["student_small_decoder"] / max(speed["teacher_full_decoder"], 1e-12)
    fd_ratio = fd_small / max(fd_full, 1e-12)
    figures = {
        "n": len(seeds), "fd_full_decoder": fd_full, "fd_small_decoder": fd_small, "fd_ratio": fd_ratio,
        "fd_target_ratio": FD_TARGET_RATIO, "fd_met": bool(fd_ratio <= FD_TARGET_RATIO),
        "images_per_second": speed, "timed_images": {"teacher": timed, "student": len(seeds)},
        "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
        "speedup_vs_teacher": speedup,
        "speedup_with_full_decoder": speed["student_full_decoder"] / max(speed["teacher_full_decoder"], 1e-12),
        "speedup_target": SPEEDUP_TARGET, "speedup_met": bool(speedup >= SPEEDUP_TARGET),
    }
    return figures, images


def summary_line(figures: dict) -> str:
    """One sentence with every figure and whether each target is met."""
    speed = figures["images_per_second"]
    verdict = {True: "met", False: "not met"}
    return (f"One-step generation end to end ({figures['student']}, n = {figures['n']}, batch "
            f"{figures['batch_size']}, {figures['torch_threads']} threads): {speed['student_small_decoder']:.0f} "
            f"images/s with the small decoder ({speed['student_full_decoder']:.0f} with the autoencoder's) vs the "
            f"guided teacher's {speed['teacher_full_decoder']:.1f} ({speed['teacher_small_decoder']:.1f} with the "
            f"small decoder): {figures['speedup_vs_teacher']:.1f}x (target >= {figures['speedup_target']:g}x: "
            f"{verdict[figures['speedup_met']]}; {figures['speedup_with_full_decoder']:.1f}x with the autoencoder's "
            f"decoder). FD {figures['fd_small_decoder']:.1f} with the small decoder vs {figures['fd_full_decoder']:.1f}"
            f" with the autoencoder's, ratio {figures['fd_ratio']:.3f} (target <= {figures['fd_target_ratio']:g}: "
            f"{verdict[figures['fd_met']]}).")
