"""Prompted samples of a text-conditional model and their class accuracy (README: Text to image).

Reads a finished run of ``configs/text.yaml`` in ``--root``: the denoiser (``models/ldm``), the autoencoder
(``models/vae``) and the classifier ``evaluate`` trained on the real train split (``reports/evaluate/classifier``).
Each prompt gets ``-n`` images, each from its own seed, with the model's own sampler, steps and guidance; the
classifier scores each image against the class the prompt names. Two prompt sets: the training captions ("a photo
of a <class>") and the same template with a noun the model never saw in training ("a photo of a running shoe").
Writes a grid with the prompt on each row and prints one line per prompt, the accuracy of each set and the seconds
it took.

    python docs/text_to_image.py --root . --out docs/text_to_image.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from gmpipe.data.captions import caption_for_class
from gmpipe.data.prepared import load_manifest
from gmpipe.eval.classifier import load_classifier, predict
from gmpipe.eval.grids import save_grid
from gmpipe.generator import load_generator
from gmpipe.pixels import uint8_to_signed

# Nouns absent from the training captions, one per Fashion-MNIST class, in the captions' own template.
OTHER_WORDS = {"T-shirt/top": "a tee shirt", "Trouser": "some jeans", "Pullover": "a knitted sweater",
               "Dress": "a summer dress", "Coat": "a winter jacket", "Sandal": "a flip-flop", "Shirt": "a blouse",
               "Sneaker": "a running shoe", "Bag": "a handbag", "Ankle boot": "a short boot"}


def generate_and_score(generator, classifier, prompts: list[str], classes: list[int], n: int, seed: int):
    """uint8 images (len(prompts) * n, C, H, W), row by row, and the fraction of each row scored as its class."""
    requests = [prompt for prompt in prompts for _ in range(n)]
    images, nfe = generator.generate(requests, [seed + i for i in range(len(requests))])
    predicted = predict(classifier, uint8_to_signed(images)).view(len(prompts), n)
    hits = (predicted == torch.tensor(classes).view(-1, 1)).double().mean(dim=1)
    return images, hits.tolist(), nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("-n", type=int, default=100, help="images per prompt (default 100)")
    parser.add_argument("--grid-columns", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/text_to_image.png"))
    args = parser.parse_args()

    class_names = load_manifest(args.root / "data/prepared")["class_names"]
    generator = load_generator(args.root / "models/ldm", autoencoder=args.root / "models/vae")
    classifier = load_classifier(args.root / "reports/evaluate/classifier")
    classes = list(range(len(class_names)))
    sets = {"training captions": [caption_for_class(name) for name in class_names],
            "other words": [f"a photo of {OTHER_WORDS.get(name, 'a ' + name.lower())}" for name in class_names]}
    grids = []
    for offset, (title, prompts) in enumerate(sets.items()):
        start = time.perf_counter()
        images, hits, nfe = generate_and_score(generator, classifier, prompts, classes, args.n,
                                               seed=offset * 10**6)
        seconds = time.perf_counter() - start
        for prompt, name, hit in zip(prompts, class_names, hits, strict=True):
            print(f"{title}: {prompt!r} -> {name}: {hit:.0%} of {args.n}")
        print(f"{title}: accuracy {np.mean(hits):.1%} (n = {len(images)}, {nfe} network evaluations per image, "
              f"{seconds:.0f} s with decoding and scoring)")
        rows = images.reshape(len(prompts), args.n, *images.shape[1:])[:, : args.grid_columns]
        grids.append((rows, prompts))
    rows = np.concatenate([r for r, _ in grids])
    labels = [prompt for _, prompts in grids for prompt in prompts]
    save_grid(rows.reshape(-1, *rows.shape[2:]), args.out, columns=args.grid_columns, row_labels=labels)
    print(f"settings: {generator.resolve_settings({})}; grid: {args.out}")


if __name__ == "__main__":
    main()
