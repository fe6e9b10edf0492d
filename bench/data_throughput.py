"""6. Data: images/s of the ``prepare`` stage on Fashion-MNIST and on an image folder of generated PNGs, and of
``cache_latents``' encoder (``encode_to_latents`` with the demo autoencoder at cache_latents' batch size).

Fashion-MNIST is the Debian package's 70,000 images in full runs (the committed 2,500-image fixture in quick
runs or when the package is missing). The image folder holds PNGs of assorted sizes and modes (RGB, L, RGBA, P)
in a few classes, prepared to 32 px RGB.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.measure import interleave, median, quiet_stderr, speedup, spread, timed
from bench.report import REPO, Section
from bench.workloads import demo_autoencoder, synthetic_images
from gmpipe.config.cache_latents import CacheLatentsConfig
from gmpipe.config.data import FASHION_MNIST_DIR, DataConfig
from gmpipe.config.prepare import PrepareConfig
from gmpipe.nn.autoencoder import encode_to_latents
from gmpipe.paths import Paths
from gmpipe.stages import prepare

SIZES = {
    "full": dict(fashion_mnist=FASHION_MNIST_DIR, pngs=400, encode=4096, rounds=3),
    "quick": dict(fashion_mnist=None, pngs=40, encode=128, rounds=2),
}
FIXTURE = REPO / "tests" / "fixtures" / "fashion-mnist-mini"
CLASSES = 4
MODES = ("RGB", "L", "RGBA", "P")


def write_png_folder(root: Path, count: int, seed: int = 0) -> Path:
    """count PNGs, 48-160 px on a side, smooth colour gradients plus noise, spread over CLASSES sub-folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = rng.integers(48, 161, size=2)
        ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(0, 255, 3)
        pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        mode = MODES[i % len(MODES)]
        image = image.quantize(64) if mode == "P" else image.convert(mode)
        folder = root / f"class_{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
    return root


def prepare_case(data: DataConfig, out: Path, counted: list[int]):
    """A case running the prepare stage function; it records how many images it wrote."""

    def case() -> None:
        with quiet_stderr():
            summary = prepare.run(data, PrepareConfig(), Paths(out))
        counted.append(sum(summary["counts"].values()))

    return timed(case)


def encode_case(vae, images: np.ndarray, batch_size: int):
    def case() -> None:
        with quiet_stderr():
            encode_to_latents(vae, images, batch_size, "encode")

    return timed(case)


def run(size: str = "full", root=None) -> dict:
    s = SIZES[size]
    fashion_dir = Path(s["fashion_mnist"]) if s["fashion_mnist"] else FIXTURE
    notes = []
    if not (fashion_dir / "train-images-idx3-ubyte.gz").is_file():
        notes.append(f"{fashion_dir}: not found, the committed fixture is used instead")
        fashion_dir = FIXTURE
    vae = demo_autoencoder()
    images = synthetic_images(s["encode"]).numpy()
    batch_size = CacheLatentsConfig().batch_size
    fashion_count, folder_count = [], []
    with tempfile.TemporaryDirectory(prefix="gmpipe-bench-data-") as tmp:
        tmp = Path(tmp)
        folder = write_png_folder(tmp / "images", s["pngs"])
        encode = "cache_latents encoder (demo autoencoder)"
        seconds = interleave({
            "prepare: Fashion-MNIST idx": prepare_case(DataConfig(path=str(fashion_dir)), tmp / "fm", fashion_count),
            "prepare: image folder (PNG, 32 px RGB)": prepare_case(
                DataConfig(source="image_folder", path=str(folder), channels=3), tmp / "folder", folder_count),
            encode: encode_case(vae, images, batch_size),
        }, s["rounds"])

    counts = {"prepare: Fashion-MNIST idx": fashion_count[0], "prepare: image folder (PNG, 32 px RGB)":
              folder_count[0], encode: len(images)}
    rates = {name: [counts[name] / t for t in seconds[name]] for name in seconds}
    fashion = seconds["prepare: Fashion-MNIST idx"]
    rows = [[name, counts[name], median(t), median(rates[name]), spread(rates[name]),
             speedup([v / counts[name] for v in t], [v / counts["prepare: Fashion-MNIST idx"] for v in fashion])]
            for name, t in seconds.items()]
    section = Section("data", "Data: prepare and cache_latents throughput", s["rounds"],
                      ["case", "images", "seconds", "img/s", "img/s range", "per-image speed vs Fashion-MNIST"], rows)
    section.ratios["image folder / Fashion-MNIST prepare (img/s)"] = rows[1][5]
    section.ratios["cache_latents encoding / Fashion-MNIST prepare (img/s)"] = rows[2][5]
    section.notes += notes + [f"Fashion-MNIST from {fashion_dir}; encoder batch {batch_size} "
                              "(cache_latents default), random uint8 images of the demo shape"]
    return section.finish(seconds)


if __name__ == "__main__":
    from bench.command import section_main

    section_main(run)
