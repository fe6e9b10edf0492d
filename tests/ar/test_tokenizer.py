"""Scalar quantization of latents: token order, round trips, the reconstruction floor, fitting, the JSON file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gmpipe.ar.tokenizer import TOKENIZER_FILE, LatentTokenizer, reconstruction_floor
from gmpipe.artifacts import ArtifactError

SHAPE = (3, 2, 4)  # (c, h, w): all three distinct so a wrong order cannot pass by symmetry


def _latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_tokens_run_over_positions_with_the_channels_of_a_position_together():
    tokenizer = LatentTokenizer.uniform(8, 2.0, SHAPE)
    x = _latents(3)
    tokens = tokenizer.encode(x)
    c, h, w = SHAPE
    assert tokens.shape == (3, c * h * w) and tokens.dtype == torch.long
    width = 4.0 / 8
    for b in range(3):
        for i in range(h):
            for j in range(w):
                for k in range(c):
                    expected = min(max(math.floor((float(x[b, k, i, j]) + 2.0) / width), 0), 7)
                    assert tokens[b, (i * w + j) * c + k] == expected


def test_round_trip_is_within_half_a_bin_and_decoding_is_a_fixed_point():
    tokenizer = LatentTokenizer.uniform(16, 3.0, SHAPE)
    x = _latents(50).clamp(-3, 3)
    tokens = tokenizer.encode(x)
    decoded = tokenizer.decode(tokens)
    assert decoded.shape == x.shape
    assert float((decoded - x).abs().max()) <= 3.0 / 16 + 1e-6  # half of the width 6 / 16
    assert torch.equal(tokenizer.encode(decoded), tokens)  # a bin center lies in its own bin


def test_values_beyond_the_clip_range_go_to_the_outer_bins():
    tokenizer = LatentTokenizer.uniform(4, 1.0, (1, 1, 2))
    tokens = tokenizer.encode(torch.tensor([[[[-7.0, 9.0]]]]))
    assert tokens.tolist() == [[0, 3]]
    torch.testing.assert_close(tokenizer.decode(tokens), torch.tensor([[[[-0.75, 0.75]]]]))


def test_floor_of_uniform_bins_on_uniform_data_is_width_squared_over_twelve():
    # x ~ U(-a, a), midpoints of bins of width d: the error is U(-d/2, d/2), MSE = d^2 / 12. The MSE estimate's
    # relative standard deviation is sqrt(1/80 - 1/144) * 12 / sqrt(n) = 0.89 / sqrt(n): 0.2% at n = 196,608;
    # the tolerance is 1% (5 standard deviations). PSNR = 10 log10((2a)^2 / MSE) = 10 log10(12 bins^2).
    bins, clip = 32, 3.0
    tokenizer = LatentTokenizer.uniform(bins, clip, (4, 8, 8))
    x = (torch.rand(768, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1) * clip
    floor = reconstruction_floor(tokenizer, x, batch_size=100)
    width = 2 * clip / bins
    assert floor.mse == pytest.approx(width**2 / 12, rel=0.01)
    assert floor.psnr_db == pytest.approx(10 * math.log10(12 * bins**2), abs=0.05)
    assert floor.snr_db == pytest.approx(10 * math.log10(clip**2 / 3 / (width**2 / 12)), abs=0.1)
    assert floor.clipped_fraction == 0 and floor.n_values == x.numel()


def test_floor_counts_clipped_values_and_their_error():
    tokenizer = LatentTokenizer.uniform(2, 1.0, (1, 1, 1))  # centers -0.5 and 0.5
    x = torch.tensor([-3.0, -0.5, 0.25, 2.0]).view(4, 1, 1, 1)
    floor = reconstruction_floor(tokenizer, x)
    assert floor.mse == pytest.approx((2.5**2 + 0 + 0.25**2 + 1.5**2) / 4)
    assert floor.clipped_fraction == 0.5


def test_quantile_fit_fills_every_bin_equally_and_centers_are_bin_means():
    x = _latents(4000) * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)  # different spread per channel
    tokenizer = LatentTokenizer.fit(x, bins=10, clip=4.0, spacing="quantile")
    tokens = tokenizer.encode(x)
    per_channel = tokens.view(len(x), -1, 3)  # "hwc": the channel is the fastest index
    for k in range(3):
        counts = torch.bincount(per_channel[..., k].flatten(), minlength=10)
        assert int(counts.max() - counts.min()) <= 2  # 8 * 4000 values per channel, quantile ties aside
        values = x[:, k].clamp(-4, 4).flatten().double()
        for j in (0, 4, 9):
            inside = values[per_channel[..., k].flatten() == j]
            assert float(tokenizer.centers[k, j]) == pytest.approx(float(inside.mean()), abs=1e-9)
    assert tokenizer.edges[0, -2] < tokenizer.edges[2, -2]  # the wider channel gets wider bins


def test_uniform_fit_has_equal_widths_and_data_mean_centers():
    x = _latents(200)
    tokenizer = LatentTokenizer.fit(x, bins=6, clip=3.0, spacing="uniform")
    torch.testing.assert_close(tokenizer.edges[1], torch.linspace(-3, 3, 7, dtype=torch.float64))
    assert bool(((tokenizer.centers >= tokenizer.edges[:, :-1]) & (tokenizer.centers <= tokenizer.edges[:, 1:])).all())


def test_json_round_trip_and_damaged_files(tmp_path):
    tokenizer = LatentTokenizer.fit(_latents(300), bins=12, clip=3.0)
    path = tokenizer.save(tmp_path)
    assert path.name == TOKENIZER_FILE
    again = LatentTokenizer.load(tmp_path)
    x = _latents(5, seed=1)
    assert torch.equal(again.encode(x), tokenizer.encode(x))
    torch.testing.assert_close(again.decode(tokenizer.encode(x)), tokenizer.decode(tokenizer.encode(x)))
    assert again.to_config() == tokenizer.to_config()

    config = json.loads(path.read_text())
    config["edges"][1][3], config["edges"][1][4] = config["edges"][1][4], config["edges"][1][3]
    path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"tokenizer.json: .*channel 1: edges are not increasing.*'train_ar'"):
        LatentTokenizer.load(tmp_path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        LatentTokenizer.load(tmp_path)
    path.unlink()
    with pytest.raises(ArtifactError, match="missing; run the 'train_ar' stage first"):
        LatentTokenizer.load(tmp_path)


def test_bad_inputs_are_refused():
    tokenizer = LatentTokenizer.uniform(8, 2.0, SHAPE)
    with pytest.raises(ValueError, match="NaN"):
        tokenizer.encode(torch.full((1, *SHAPE), math.nan))
    with pytest.raises(ValueError, match="expects"):
        tokenizer.encode(torch.zeros(1, 3, 4, 2))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        tokenizer.decode(torch.full((1, 24), 8))
    with pytest.raises(ValueError, match="bins"):
        LatentTokenizer.uniform(1, 2.0, SHAPE)
