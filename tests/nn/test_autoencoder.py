import pytest
import torch
from diffusers import AutoencoderKL

from gmpipe.nn.autoencoder import (
    AUTOENCODER_PRESETS,
    CPU_PASS_IMAGES,
    attention_outputs_in_default_layout,
    autoencoder_passes,
    build_autoencoder,
    build_autoencoder_preset,
    check_image_size,
    decode_latents,
    decoder_last_layer,
    downsampling_factor,
    encode_to_latents,
    load_autoencoder,
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


def _recording_passes(vae, method):
    """Wrap ``vae.<method>`` to record the batch size of every call."""
    sizes, original = [], getattr(vae, method)

    def recorded(x, *args, **kwargs):
        sizes.append(len(x))
        return original(x, *args, **kwargs)

    setattr(vae, method, recorded)
    return sizes


def test_a_cpu_decodes_and_encodes_in_passes_of_at_most_cpu_pass_images_with_the_same_result():
    torch.manual_seed(0)
    vae = build_autoencoder_preset("tiny", 1).eval()
    n = 2 * CPU_PASS_IMAGES + 37
    z = torch.randn(n, 4, 8, 8)
    with torch.no_grad():
        whole = vae.decode(z).sample.clamp(-1, 1)
    decoded_sizes = _recording_passes(vae, "decode")
    images = decode_latents(vae, z)
    assert decoded_sizes == [CPU_PASS_IMAGES, CPU_PASS_IMAGES, 37]
    assert images.shape == (n, 1, 16, 16)
    torch.testing.assert_close(images, whole, atol=1e-5, rtol=1e-5)  # per-image work: the split changes nothing

    pixels = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8).numpy()
    encoded_sizes = _recording_passes(vae, "encode")
    mean, std = encode_to_latents(vae, pixels, batch_size=150, desc="test")
    assert encoded_sizes == [CPU_PASS_IMAGES, 50, n - 150]  # the batch of 150 in two passes, then the last 87
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(pixels).float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, posterior.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, posterior.std, atol=1e-5, rtol=1e-5)


def test_other_devices_take_the_whole_batch_in_one_pass():
    batch = torch.zeros(3 * CPU_PASS_IMAGES, 4, 2, 2)
    assert [len(part) for part in autoencoder_passes(batch, "cuda")] == [3 * CPU_PASS_IMAGES]
    assert [len(part) for part in autoencoder_passes(batch, torch.device("cpu"))] == [CPU_PASS_IMAGES] * 3


def _group_norm_inputs(vae: AutoencoderKL, x: torch.Tensor) -> list[tuple[str, bool]]:
    """(name, default layout?) of the input of every GroupNorm an encode + decode of x passes through."""
    seen, handles = [], []
    for name, module in vae.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: seen.append((name, inputs[0].is_contiguous()))))
    with torch.no_grad():
        vae.decode(vae.encode(x).latent_dist.mean)
    for handle in handles:
        handle.remove()
    return seen


def test_the_attention_hands_the_default_layout_on_to_every_group_norm(tmp_path):
    """diffusers' mid-block attention returns a channels-last image, which made every later GroupNorm (the whole
    decoder) run its much slower channels-last kernel; built and loaded autoencoders copy it back, the same numbers."""
    torch.manual_seed(0)
    vae = build_autoencoder(1, (8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    raw = AutoencoderKL.from_config(vae.config).eval()
    raw.load_state_dict(vae.state_dict())
    after_attention = [name for name, default in _group_norm_inputs(raw, x) if not default]
    assert "decoder.conv_norm_out" in after_attention  # what diffusers alone does: the hook has work to do
    assert all(default for _, default in _group_norm_inputs(vae, x))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(vae.encode(x).latent_dist.mean).sample,
                                   raw.decode(raw.encode(x).latent_dist.mean).sample)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = load_autoencoder(tmp_path / "vae")
    assert all(default for _, default in _group_norm_inputs(loaded, x))
    assert len(loaded.decoder.mid_block.attentions[0]._forward_hooks) == 1
    attention_outputs_in_default_layout(loaded)  # idempotent: one copy, however often it is asked
    assert len(loaded.decoder.mid_block.attentions[0]._forward_hooks) == 1


def test_an_autoencoder_without_attention_builds_and_runs():
    vae = build_autoencoder(1, (8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                            mid_block_attention=False).eval()
    assert all(default for _, default in _group_norm_inputs(vae, torch.zeros(1, 1, 16, 16)))


def test_a_channels_last_autoencoder_stays_channels_last_after_the_attention():
    """The hook hands back its input's layout: a model trained channels-last (for GPUs) keeps that layout."""
    torch.manual_seed(0)
    vae = build_autoencoder(1, (8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4).eval()
    vae.to(memory_format=torch.channels_last)
    x = (torch.rand(2, 1, 16, 16) * 2 - 1).contiguous(memory_format=torch.channels_last)
    seen = []
    vae.decoder.mid_block.attentions[0].register_forward_hook(
        lambda m, inputs, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        vae.decode(vae.encode(x).latent_dist.mean)
    assert seen == [True]
