"""The small decoder: images f times the latents' size for every power-of-2 factor, raw latents normalized with the
statistics it was trained on, the shapes it refuses, decoder distillation lowering its L1 to a teacher (with fresh
targets and from a target pool), and the target pool itself."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from gmpipe.config.loop import LoopConfig
from gmpipe.data.latents import LatentSplit, LatentStats
from gmpipe.nn.autoencoder import build_autoencoder, decode_latents
from gmpipe.nn.small_decoder import SmallDecoder, build_small_decoder
from gmpipe.train.loop import make_accelerator, train
from gmpipe.vae.decoder_distillation import decoded_targets, decoder_distillation_step

STATS = LatentStats(shift=(-1.0, 0.5, 0.0, 2.0), scale=(0.5, 2.0, 1.0, 0.25))


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_images_are_factor_times_the_latents(factor):
    tiny = build_small_decoder(4, 3, factor, width=8, blocks=1)
    small = SmallDecoder(tiny, STATS)
    z = torch.randn(2, 4, 5, 6) * 3
    with torch.no_grad():
        images = decode_latents(small, z)
        direct = tiny.decode(STATS.normalize(z)).sample  # the diffusers model on normalized latents
    assert images.shape == (2, 3, 5 * factor, 6 * factor)
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, direct.clamp(-1, 1))


def test_bad_factors_and_latents_are_refused():
    with pytest.raises(ValueError, match="power of 2"):
        build_small_decoder(4, 1, 3, width=8, blocks=1)
    with pytest.raises(ValueError, match="2 latent channels in the statistics"):
        SmallDecoder(build_small_decoder(4, 1, 4, width=8, blocks=1), LatentStats((0.0, 0.0), (1.0, 1.0)))
    small = SmallDecoder(build_small_decoder(4, 1, 4, width=8, blocks=1), STATS)
    with pytest.raises(ValueError, match=r"reads latents \(B, 4, h, w\), got \(2, 3, 8, 8\)"):
        small.decode(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("pool", [False, True], ids=["fresh targets", "target pool"])
def test_distillation_moves_the_small_decoder_toward_the_autoencoder(tmp_path, pool):
    """A few loop steps of the distillation loss on random latents, the targets decoded every step or taken from a
    pool decoded before: the L1 to the frozen autoencoder's images falls, and the autoencoder is untouched."""
    torch.manual_seed(0)
    autoencoder = build_autoencoder(1, (8, 8, 8), 4, 1, 4)
    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    small = SmallDecoder(build_small_decoder(4, 1, 4, width=8, blocks=1), STATS)
    latents = torch.randn(64, 4, 4, 4) / torch.tensor(STATS.scale).view(1, 4, 1, 1) + \
        torch.tensor(STATS.shift).view(1, 4, 1, 1)
    fixed = latents[:16]

    def l1() -> float:
        with torch.no_grad():
            return float((decode_latents(small, fixed) - decode_latents(autoencoder, fixed)).abs().mean())

    start = l1()
    config = LoopConfig(steps=30, batch_size=16, lr=3e-3, ema_decay=0.0, checkpoint_every=30, log_every=10)
    if pool:
        with torch.no_grad():
            targets = autoencoder.decode(latents).sample.clamp(-1, 1)

        def batch(index, device):
            return latents[index].to(device), targets[index].to(device)
    else:
        def batch(index, device):
            return latents[index].to(device)
    train(config, [decoder_distillation_step(small, autoencoder)], len(latents), batch, tmp_path / "checkpoints",
          accelerator=make_accelerator())
    assert l1() < 0.7 * start
    assert all(torch.equal(before[k], v) for k, v in autoencoder.state_dict().items())


def test_target_pool_is_seeded_covers_the_split_and_holds_the_autoencoders_images():
    """n posterior samples of the training latents, each item once per pass (25 of 10 items: every item twice, then
    5 more), z = mean + std * eps with fresh eps per sample, the autoencoder's clamped images of exactly those z;
    the same seed gives the same pool (a resumed run trains on what it started with), another seed another."""
    torch.manual_seed(0)
    autoencoder = build_autoencoder(1, (8, 8, 8), 4, 1, 4).eval()
    mean = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 4, 4, 4).contiguous()
    split = LatentSplit(mean, torch.full_like(mean, 1e-3), torch.zeros(10, dtype=torch.long),
                        torch.zeros(10, dtype=torch.long))
    z, images = decoded_targets(autoencoder, split, 25, seed=3, batch_size=7, autocast=nullcontext)
    items = z.mean(dim=(1, 2, 3)).round().long()
    assert z.shape == (25, 4, 4, 4) and images.shape == (25, 1, 16, 16)
    assert sorted(items[:10].tolist()) == sorted(items[10:20].tolist()) == list(range(10))
    assert len(set(items[20:].tolist())) == 5
    assert float((z - mean[items]).abs().max()) < 0.01 and not torch.equal(z, mean[items])
    with torch.no_grad():
        torch.testing.assert_close(images, autoencoder.decode(z).sample.clamp(-1, 1))
    again_z, again_images = decoded_targets(autoencoder, split, 25, seed=3, batch_size=7, autocast=nullcontext)
    assert torch.equal(again_z, z) and torch.equal(again_images, images)
    other_z, _ = decoded_targets(autoencoder, split, 25, seed=4, batch_size=7, autocast=nullcontext)
    assert not torch.equal(other_z, z)
