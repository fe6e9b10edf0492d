"""One-step generation end to end at the demo's size, outside the pipeline: train the small decoder on a project's
cached latents (``train_decoder``'s own ``run`` with the ``params.yaml`` section and JSON overrides) and measure, as
``evaluate`` does (``gmpipe.eval.end_to_end``), the best student's FD with both decoders and the end-to-end speeds.

    OMP_NUM_THREADS=2 python -m bench.one_step_decoding ROOT ['{"full_resolution_blocks": 0}'] [STUDENT]

ROOT holds data/latents, data/prepared, models/vae, models/ldm and models/student/STUDENT (default
progressive-1step) of a finished demo run; the decoder and its checkpoints are written under ROOT. Not part of
``python -m bench``: it trains for minutes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gmpipe.config.params import load_params
from gmpipe.data.prepared import load_split
from gmpipe.eval import end_to_end
from gmpipe.eval.generated import Reference
from gmpipe.generator import load_decoder_for, load_generator
from gmpipe.nn.features import EffNetLite0Features
from gmpipe.paths import Paths
from gmpipe.pixels import uint8_to_signed
from gmpipe.seeds import seed_block
from gmpipe.stages import evaluate, train_decoder


def main(argv: list[str]) -> None:
    paths = Paths(Path(argv[0]))
    overrides = json.loads(argv[1]) if len(argv) > 1 else {}
    name = argv[2] if len(argv) > 2 else "progressive-1step"
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    config = params.train_decoder.replace(**overrides)
    start = time.perf_counter()
    summary = train_decoder.run(config, params.compute.model_copy(update={"threads": 2}), paths)
    print(f"train_decoder: {time.perf_counter() - start:.1f} s wall", json.dumps(summary["metrics"]), flush=True)

    torch.set_num_threads(2)
    ev = params.evaluate
    test = load_split(paths.prepared, "test")  # the real test images evaluate compares with, chosen as it does
    order = np.random.default_rng(ev.seed).permutation(len(test))[: min(max(ev.n_samples, ev.sweep_samples),
                                                                          len(test))]
    extractor = EffNetLite0Features(image_size=ev.feature_image_size)
    real = extractor.extract(uint8_to_signed(test.images[order]), batch_size=ev.batch_size)
    reference = Reference(real, extractor, None, None, ev.kid_subsets, ev.pr_k, ev.batch_size)

    def fd_of(images: np.ndarray) -> float:
        return reference.measure(uint8_to_signed(images))["fd_effnet"]

    student = load_generator(paths.student / name, autoencoder=paths.vae)
    teacher = load_generator(paths.ldm, autoencoder=paths.vae)
    n = ev.n_samples
    labels = evaluate.balanced_labels(n, len(student.conditioning.rows()))
    seeds = seed_block(ev.seed, evaluate.HEADLINE_SEEDS, n)
    full, _ = student.generate(labels, seeds, batch_size=ev.batch_size, steps=1)
    figures, _ = end_to_end.measure_end_to_end(
        teacher, student, load_decoder_for(paths.decoder, paths.vae), teacher_settings={"guidance": 1.0},
        student_settings={"steps": 1}, labels=labels, seeds=seeds, timing_images=ev.batch_size,
        batch_size=ev.batch_size, fd_of=fd_of, fd_full=fd_of(full))
    figures["student"] = name
    print(json.dumps(figures, indent=1))
    print(end_to_end.summary_line(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
