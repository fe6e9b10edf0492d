"""train_ar and train_gan on the fixture: each writes a model folder that loads through ``load_generator`` and
generates reproducibly per seed whatever the batch, its metrics are present and finite (the AR's bits per token
recomputed here on the test tokens), `gmpipe sample` uses it like any model, and a rerun with more steps continues
while a changed key starts over."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gmpipe.ar.data import tokenize_split
from gmpipe.ar.family import AutoregressivePrior
from gmpipe.ar.likelihood import token_likelihood
from gmpipe.cli import main
from gmpipe.config.params import ParamsError, parse_params
from gmpipe.data.latents import load_split
from gmpipe.errors import GmpipeError
from gmpipe.eval.grids import tile
from gmpipe.gan.family import LatentGAN
from gmpipe.generator import load_generator
from gmpipe.paths import Paths
from gmpipe.stages import cache_latents, prepare, train_ar, train_gan, train_vae
from tests.conftest import autocast_seen, smoke_params

CLASSES = 10


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Prepared fixture data, a smoke-trained autoencoder and its cached latents, shared by this module."""
    root = tmp_path_factory.mktemp("families")
    params = parse_params(smoke_params(prepare={"max_per_class": 20}, train_vae={"steps": 10, "disc_start": 5}))
    paths = Paths(root)
    prepare.run(params.data, params.prepare, paths)
    train_vae.run(params.data, params.train_vae, params.compute, paths)
    cache_latents.run(params.cache_latents, params.compute.device, params.compute.threads, paths)
    return params, paths


@pytest.fixture(scope="module")
def trained_ar(latents):
    params, paths = latents
    return params, paths, train_ar.run(params.train_ar, params.compute, paths)


@pytest.fixture(scope="module")
def trained_gan(latents):
    params, paths = latents
    return params, paths, train_gan.run(params.train_gan, params.compute, paths)


def _copy(paths: Paths, tmp_path) -> Paths:
    shutil.copytree(paths.root, tmp_path / "copy", ignore=shutil.ignore_patterns("reports"))
    return Paths(tmp_path / "copy")


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return value is None or isinstance(value, str) or math.isfinite(value)


def assert_same_up_to_rounding(actual: np.ndarray, expected: np.ndarray) -> None:
    """uint8 images equal but for the last bit of a few pixels: a convolution's float sums depend on the batch size
    (the kernel the backend picks for it), so a value within 1e-6 of a rounding boundary can land one level apart.
    A sample that depended on another's seed or request would differ by far more, in many pixels."""
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())


def assert_per_sample_seeds(generator, requests: list, seeds: list[int], **settings) -> np.ndarray:
    """Sample i depends on seeds[i] and requests[i] only: the same images in batches of 1 and of all, and each
    alone (up to the float rounding of batched convolutions); other seeds give other images. Returns the images."""
    together, _ = generator.generate(requests, seeds, batch_size=len(seeds), **settings)
    one_by_one, _ = generator.generate(requests, seeds, batch_size=1, **settings)
    assert_same_up_to_rounding(together, one_by_one)
    alone, _ = generator.generate(requests[-1:], seeds[-1:], **settings)
    assert_same_up_to_rounding(alone[0], together[-1])
    other, _ = generator.generate(requests, [seed + 1000 for seed in seeds], **settings)
    assert not np.array_equal(other, together)
    return together


def test_train_ar_writes_a_prior_that_generates_per_seed(trained_ar, tmp_path):
    params, paths, summary = trained_ar
    for name in ("family.json", "lm/model.safetensors", "ar.json", "tokenizer.json", "sampling.json",
                 "conditioning.json", "latent_stats.json", "training.json"):
        assert (paths.ar / name).exists(), name
    assert json.loads((paths.ar / "family.json").read_text()) == {"family": "autoregressive", "stage": "train_ar"}
    assert (paths.reports / "train_ar/samples.png").is_file()
    assert (paths.reports / "train_ar/live/plots/metrics/ar/bits_per_token.tsv").is_file()

    prior = load_generator(paths.ar, autoencoder=paths.vae)
    assert isinstance(prior, AutoregressivePrior) and prior.conditioning.kind == "class"
    assert prior.settings == {"guidance": 1.0, "temperature": 1.0, "top_k": None}
    length = prior.sequence_length
    assert length == 4 * 8 * 8
    images = assert_per_sample_seeds(prior, [0, 3, 9], [11, 12, 13])
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8
    assert prior.generate([0], [0])[1] == 2 * length  # guided: two evaluations per token
    assert prior.generate([0], [0], guidance=0.0, top_k=4, temperature=0.7)[1] == length
    with pytest.raises(GmpipeError, match="temperature"):
        prior.generate([0], [0], temperature=0.0)
    with pytest.raises(GmpipeError, match="top_k: must be <= 16"):
        prior.generate([0], [0], top_k=17)
    with pytest.raises(GmpipeError, match="no setting 'steps'"):
        prior.generate([0], [0], steps=4)

    out = tmp_path / "ar.npz"
    assert main(["sample", "--model", str(paths.ar), "--vae", str(paths.vae), "--classes", "2", "5", "-n", "2",
                 "--guidance", "0", "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as saved:
        assert saved["images"].shape == (4, 1, 32, 32) and saved["labels"].tolist() == [2, 2, 5, 5]


def test_train_ar_metrics_hold_the_exact_test_likelihood(trained_ar):
    params, paths, summary = trained_ar
    config = params.train_ar
    metrics = json.loads((paths.reports / "train_ar/metrics.json").read_text())
    assert _all_finite(metrics) and metrics["step"] == config.loop.steps
    assert metrics["nfe"] == 2 * metrics["sequence_length"] == 2 * 256
    assert metrics["test_sequences"] == config.nll_items and metrics["test_tokens"] == config.nll_items * 256
    # Recomputed here from the saved model on the same test tokens: the seeded subset of the test split,
    # tokenized with the saved tokenizer from the same seeded posterior draw.
    prior = load_generator(paths.ar)
    test = load_split(paths.latents, "test").subset(config.nll_items, seed=config.loop.seed)
    tokens, labels = tokenize_split(test, prior.stats, prior.tokenizer, config.posterior, seed=config.loop.seed)
    exact = token_likelihood(prior.model, tokens, labels)
    assert metrics["test_bits_per_token"] == pytest.approx(exact.bits_per_token, rel=1e-9)
    assert metrics["test_bits_per_sequence"] == pytest.approx(exact.bits_per_token * 256, rel=1e-9)
    widths = float(prior.tokenizer.log2_bin_widths(tokens).mean())
    assert metrics["test_bits_per_dim"] == pytest.approx(exact.bits_per_token + widths, rel=1e-9)
    # 20 steps already beat a uniform guess over the 16 bins (4 bits).
    assert metrics["test_bits_per_token"] < math.log2(config.bins)
    assert 0 < metrics["tokenizer_floor"]["mse"] < 0.1 and metrics["tokenizer_floor"]["n_values"] == tokens.numel()
    assert metrics["test_bits_per_token_unconditional"] > 0 and metrics["marginal_bits_per_token"] > 0
    assert summary["test_bits_per_token"] == metrics["test_bits_per_token"]


def test_train_gan_writes_a_generator_grids_and_path_length(trained_gan, tmp_path):
    params, paths, summary = trained_gan
    config = params.train_gan
    for name in ("family.json", "generator/model.safetensors", "generator_raw/config.json",
                 "discriminator/model.safetensors", "sampling.json", "conditioning.json", "latent_stats.json",
                 "training.json"):
        assert (paths.gan / name).exists(), name
    assert json.loads((paths.gan / "family.json").read_text()) == {"family": "latent_gan", "stage": "train_gan"}

    gan = load_generator(paths.gan, autoencoder=paths.vae)
    assert isinstance(gan, LatentGAN) and gan.settings == {"truncation": 1.0}
    images = assert_per_sample_seeds(gan, [1, 1, 4, 7], [0, 1, 2, 3])
    assert images.shape == (4, 1, 32, 32) and gan.generate([1], [0])[1] == 1
    mode, _ = gan.generate([4, 4], [0, 1], truncation=0.0)  # psi = 0: every seed maps to z = 0
    np.testing.assert_array_equal(mode[0], mode[1])

    metrics = json.loads((paths.reports / "train_gan/metrics.json").read_text())
    assert _all_finite(metrics) and metrics["nfe"] == 1 and metrics["step"] == config.loop.steps
    assert {"generator/loss", "discriminator/loss", "discriminator/r1"} <= set(metrics)
    assert metrics["path_length"]["n"] == config.ppl_pairs and metrics["path_length"]["ppl"] > 0
    # One slerp path per class, interpolation_steps images along it.
    with Image.open(paths.reports / "train_gan/interpolation.png") as grid:
        expected = tile(np.zeros((CLASSES * config.interpolation_steps, 1, 32, 32), np.uint8),
                        config.interpolation_steps).shape
        assert (grid.height, grid.width) == (2 * expected[0], 2 * expected[1])

    out = tmp_path / "gan.npz"
    assert main(["sample", "--model", str(paths.gan), "--vae", str(paths.vae), "--classes", "0", "-n", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as saved:
        assert saved["images"].shape == (3, 1, 32, 32)


@pytest.mark.parametrize("family", ["ar", "gan"])
def test_bf16_precision_generates_under_autocast(trained_ar, trained_gan, family):
    """``precision="bf16"`` (evaluate's ``precision``): the GAN's generator, the autoregressive prior's transformer
    blocks and every decoder run under bfloat16 autocast, the prior's output layer in float32 (its logits are
    sampling probabilities); the images keep their shape, dtype and per-seed determinism."""
    _, paths, _ = trained_ar if family == "ar" else trained_gan
    model = load_generator(getattr(paths, family), autoencoder=paths.vae, precision="bf16")
    network = autocast_seen(*(model.model.lm.transformer if family == "ar" else model.generator).modules())
    decoder = autocast_seen(model.autoencoder.decoder)
    if family == "ar":
        head_inputs = []
        model.model.lm.lm_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0].dtype))
        head = autocast_seen(model.model.lm.lm_head)
    images = assert_per_sample_seeds(model, [0, 3, 9], [11, 12, 13])
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.uint8
    assert decoder and all(decoder)
    assert network and all(network)
    if family == "ar":
        assert head and not any(head) and set(head_inputs) == {torch.float32}


def test_unconditional_families_train_and_generate(latents, tmp_path):
    """``conditioning: none``: the AR trains and samples under the null prefix alone (never guided), the GAN
    without class inputs; both answer requests of None."""
    params, shared = latents
    paths = _copy(shared, tmp_path)
    ar_config = params.train_ar.replace(conditioning="none", steps=2, warmup_steps=0, nll_items=8)
    summary = train_ar.run(ar_config, params.compute, paths)
    assert summary["nfe"] == 256 and "test_bits_per_token_unconditional" not in summary
    prior = load_generator(paths.ar, autoencoder=paths.vae)
    assert prior.model.num_classes == 1 and prior.generate(None, [0, 1], guidance=3.0)[1] == 256
    gan_config = params.train_gan.replace(conditioning="none", steps=2, ppl_pairs=2, grid_per_class=1)
    train_gan.run(gan_config, params.compute, paths)
    gan = load_generator(paths.gan, autoencoder=paths.vae)
    assert gan.generator.n_classes == 0
    assert gan.generate(None, [0, 1])[0].shape == (2, 1, 32, 32)


@pytest.mark.parametrize("section", ["train_ar", "train_gan"])
def test_text_conditioning_is_refused_in_one_line(section):
    with pytest.raises(ParamsError) as caught:
        parse_params(smoke_params(**{section: {"conditioning": "text"}}))
    assert caught.value.all_problems == [
        f"{section}.conditioning: the {'autoregressive prior' if section == 'train_ar' else 'latent GAN'} is built for "
        "none or class only, not 'text' (got 'text')"]


@pytest.mark.parametrize("stage, changed", [(train_ar, {"bins": 8}), (train_gan, {"loss": "non_saturating"})],
                         ids=["train_ar", "train_gan"])
def test_more_steps_continue_and_a_changed_key_starts_over(trained_ar, trained_gan, tmp_path, capsys, stage,
                                                           changed):
    params, shared, _ = trained_ar
    name = stage.__name__.rsplit(".", 1)[1]
    paths = _copy(shared, tmp_path)
    config = getattr(params, name)
    steps = config.loop.steps
    capsys.readouterr()
    more = stage.run(config.replace(steps=steps + 2), params.compute, paths)
    assert more["resumed_from"] == steps and more["steps"] == steps + 2
    assert f"{name}: resuming from" in capsys.readouterr().out
    other = stage.run(config.replace(steps=2, warmup_steps=0, **changed), params.compute, paths)
    assert other["resumed_from"] == 0
    key = next(iter(changed))
    assert f"{name}: starting over: {name}.{key} changed" in capsys.readouterr().out
    assert (paths.checkpoints / f"{name}.stale").is_dir()
