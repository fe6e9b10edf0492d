"""Sets that are never generated twice, on a small real latent diffusion model (untrained weights, a real
autoencoder): a smaller set is the first n of a larger one at the same settings, exactly what a fresh call with
those seeds makes, and a point met twice (the defaults named or left out) is generated and measured once."""

from __future__ import annotations

import numpy as np
import pytest

from gmpipe.eval.sample_bank import SampleBank
from gmpipe.generator import load_generator
from gmpipe.seeds import seed_block
from tests.hostile import write_model_folders

N = 12


class CountingGenerator:
    """The real generator, with every generate call's seeds recorded (what the bank asked it to make)."""

    def __init__(self, generator) -> None:
        self.generator, self.calls = generator, []

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def generate(self, requests, seeds, **options):
        self.calls.append((list(seeds), {k: v for k, v in options.items() if k != "batch_size"}))
        return self.generator.generate(requests, seeds, **options)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ldm, vae = write_model_folders(tmp_path_factory.mktemp("bank"))
    return load_generator(ldm, autoencoder=vae)


def assert_same_images(reused: np.ndarray, fresh: np.ndarray) -> None:
    """Equal up to float rounding (another batch composition may sum in another order): at most one level, in a
    pixel on a rounding boundary."""
    difference = np.abs(reused.astype(int) - fresh.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99


def test_a_smaller_set_is_the_first_n_of_the_larger_one(model):
    labels, seeds = [i % 2 for i in range(N)], seed_block(0, 1, N)
    counting = CountingGenerator(model)
    bank = SampleBank(counting, labels, seeds, batch_size=5)

    sweep = bank.draw(4, guidance=0.5)  # a sweep point first, then the headline set at the same w
    headline = bank.draw(N, guidance=0.5)
    assert [call[0] for call in counting.calls] == [seeds[:4], seeds[4:]]  # only the 8 it did not hold
    fresh = model.generate(labels, seeds, batch_size=N, guidance=0.5)
    assert_same_images(headline.images, fresh.images)
    np.testing.assert_array_equal(headline.images[:4], sweep.images)
    assert headline.nfe == fresh.nfe == 2 * model.settings["steps"] and headline.images_per_second > 0

    # The same point named another way (the default sampler and steps given) is neither generated nor measured again.
    extracted = []

    def extract(images):
        extracted.append(len(images))
        return images.reshape(len(images), -1).astype(np.float64) / 255

    first = bank.features(4, extract, guidance=0.5)
    again = bank.features(N, extract, sampler="euler", steps=model.settings["steps"], guidance=0.5)
    assert extracted == [4, N - 4] and len(counting.calls) == 2
    np.testing.assert_array_equal(again[:4], first)
    np.testing.assert_array_equal(again, extract(headline.images))

    # Another setting is another set; samples of another seed are other images.
    other = bank.draw(4, guidance=1.0)
    assert len(counting.calls) == 3 and not np.array_equal(other.images, sweep.images)
    shifted = model.generate(labels[:4], seed_block(0, 0, 4), batch_size=4, guidance=0.5)
    assert not np.array_equal(shifted.images, sweep.images)
    with pytest.raises(ValueError, match="holds seeds for 1..12"):
        bank.draw(N + 1, guidance=0.5)
