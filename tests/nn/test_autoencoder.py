import pytest
import torch
from diffusers import AutoencoderKL

from gmpipe.nn.autoencoder import (
    AUTOENCODER_PRESETS,
    build_autoencoder,
    build_autoencoder_preset,
    check_image_size,
    decoder_last_layer,
    downsampling_factor,
)


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_shapes(channels):
    torch.manual_seed(0)
    vae = build_autoencoder_preset("tiny", channels).eval()
    x = torch.rand(2, channels, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample()).sample
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert x_hat.shape == x.shape
    assert vae.config.scaling_factor == 1.0  # the latent scale is measured on the data, not assumed


@pytest.mark.parametrize(("widths", "latent_size"), [((8, 16), 14), ((8, 8, 8), 7)])
def test_28_pixel_images_round_trip_when_divisible(widths, latent_size):
    vae = build_autoencoder(1, widths, latent_channels=2, layers_per_block=1, norm_num_groups=4).eval()
    x = torch.zeros(1, 1, 28, 28)
    check_image_size(vae, 28, 28)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        assert mean.shape[-2:] == (latent_size, latent_size)
        assert vae.decode(mean).sample.shape == x.shape


def test_sizes_not_divisible_by_the_factor_are_rejected():
    # f = 8: 28 -> 14 -> 7 -> 3 latents, decoded back to 24x24: check_image_size says so before training
    vae = build_autoencoder(1, (8, 8, 8, 8), latent_channels=2, layers_per_block=1, norm_num_groups=4).eval()
    assert downsampling_factor(vae) == 8
    with torch.no_grad():
        assert vae(torch.zeros(1, 1, 28, 28)).sample.shape[-2:] == (24, 24)
    with pytest.raises(ValueError, match="divisible"):
        check_image_size(vae, 28, 28)
    check_image_size(vae, 32, 32)


def test_save_and_reload_with_diffusers(tmp_path):
    torch.manual_seed(0)
    vae = build_autoencoder_preset("tiny", 1).eval()
    vae.save_pretrained(tmp_path / "vae")
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    assert tuple(reloaded.config.block_out_channels) == tuple(vae.config.block_out_channels) == (8, 16)


def test_decoder_last_layer_is_the_final_conv_weight():
    vae = build_autoencoder_preset("tiny", 3)
    last = decoder_last_layer(vae)
    assert last is vae.decoder.conv_out.weight
    assert last.shape == (3, 8, 3, 3) and last.requires_grad


def test_invalid_sizes_and_presets():
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_autoencoder(1, (8, 12), latent_channels=4, layers_per_block=1, norm_num_groups=8)
    with pytest.raises(KeyError, match="tiny"):
        build_autoencoder_preset("huge", 1)
    for preset in AUTOENCODER_PRESETS.values():
        assert all(width % preset.norm_num_groups == 0 for width in preset.block_out_channels)
    assert AUTOENCODER_PRESETS["small"].downsampling_factor == 4
