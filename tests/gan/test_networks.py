"""The generator and the projection discriminator: shapes, sizes, conditioning, per-sample independence, saving."""

from __future__ import annotations

import json

import pytest
import torch

from gmpipe.artifacts import ArtifactError
from gmpipe.gan.discriminator import ProjectionDiscriminator
from gmpipe.gan.generator import ConditionalGenerator, resolution_levels
from gmpipe.gan.saving import CONFIG_FILE, WEIGHTS_FILE


@pytest.mark.parametrize(("size", "levels"), [
    ((8, 8), [(4, 4), (8, 8)]),
    ((16, 16), [(4, 4), (8, 8), (16, 16)]),
    ((4, 4), [(4, 4)]),
    ((1, 1), [(1, 1)]),
    ((7, 7), [(7, 7)]),
    ((12, 8), [(6, 4), (12, 8)]),
])
def test_resolution_levels(size, levels):
    assert resolution_levels(*size) == levels


@pytest.mark.parametrize("latent_shape", [(4, 8, 8), (3, 16, 16), (2, 1, 1), (4, 7, 7), (4, 12, 8)])
def test_shapes(latent_shape):
    generator = ConditionalGenerator(latent_shape, n_classes=3, z_dim=16, width=16)
    discriminator = ProjectionDiscriminator(latent_shape, n_classes=3, width=16)
    labels = torch.tensor([0, 2, 1, 1, 0])
    latents = generator(torch.randn(5, 16), labels)
    assert latents.shape == (5, *latent_shape)
    assert discriminator(latents, labels).shape == (5,)


def test_demo_sizes_are_a_few_hundred_thousand_parameters():
    generator = ConditionalGenerator((4, 8, 8), n_classes=10)
    discriminator = ProjectionDiscriminator((4, 8, 8), n_classes=10)
    assert 200_000 < generator.num_parameters() < 400_000
    assert 200_000 < discriminator.num_parameters() < 400_000
    # spectral normalization reparametrizes the weights; it adds none
    assert ProjectionDiscriminator((4, 8, 8), 10, spectral_norm=True).num_parameters() == \
        discriminator.num_parameters()


def test_the_class_changes_the_output():
    generator = ConditionalGenerator((4, 8, 8), n_classes=10, width=16)
    z = torch.randn(1, 64).expand(3, -1)
    latents = generator(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(latents[0], latents[1]) and not torch.allclose(latents[1], latents[2])


def test_projection_term_is_the_inner_product_with_the_class_embedding():
    discriminator = ProjectionDiscriminator((4, 8, 8), n_classes=10, width=16)
    x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    logits = discriminator(x, torch.tensor([3, 7]))
    phi = discriminator.features(x[:1])[0]
    embedding = discriminator.embed.weight
    torch.testing.assert_close(logits[0] - logits[1], ((embedding[3] - embedding[7]) * phi).sum())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_sample_does_not_depend_on_the_rest_of_the_batch(mode):
    generator = ConditionalGenerator((4, 8, 8), n_classes=10, width=16).train(mode == "train")
    discriminator = ProjectionDiscriminator((4, 8, 8), n_classes=10, width=16).train(mode == "train")
    z, labels = torch.randn(6, 64), torch.tensor([0, 1, 2, 3, 4, 5])
    alone = generator(z[2:3], labels[2:3])
    torch.testing.assert_close(generator(z, labels)[2:3], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(discriminator(alone.expand(4, -1, -1, -1), labels[2:3].expand(4))[:1],
                               discriminator(alone, labels[2:3]), rtol=1e-5, atol=1e-5)


def test_unconditional_networks_and_label_mistakes():
    generator = ConditionalGenerator((4, 8, 8), n_classes=0, z_dim=8, width=16)
    discriminator = ProjectionDiscriminator((4, 8, 8), n_classes=0, width=16)
    assert generator.embed is None and discriminator.embed is None
    assert discriminator(generator(torch.randn(2, 8))).shape == (2,)
    with pytest.raises(ValueError, match="unconditional"):
        generator(torch.randn(2, 8), torch.tensor([0, 1]))
    conditional = ConditionalGenerator((4, 8, 8), n_classes=10, z_dim=8, width=16)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        conditional(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        conditional(torch.randn(2, 9), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, 8, 8\)"):
        ProjectionDiscriminator((4, 8, 8), 10, width=16)(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"latent_shape": (4, 0, 8)}, "latent_shape"),
    ({"z_dim": 0}, "z_dim must be >= 1"),
    ({"n_classes": -1}, "n_classes must be >= 0"),
])
def test_bad_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConditionalGenerator(**kwargs)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_save_and_load_round_trip(tmp_path, spectral_norm):
    generator = ConditionalGenerator((4, 8, 8), n_classes=10, z_dim=16, width=16)
    discriminator = ProjectionDiscriminator((4, 8, 8), n_classes=10, width=16, spectral_norm=spectral_norm)
    z, labels = torch.randn(3, 16), torch.tensor([1, 5, 9])
    discriminator(generator(z, labels), labels)  # a training-mode pass moves the spectral norm's power iteration
    generator.eval(), discriminator.eval()
    generator.save_pretrained(tmp_path / "generator")
    discriminator.save_pretrained(tmp_path / "discriminator")
    assert json.loads((tmp_path / "generator" / CONFIG_FILE).read_text())["z_dim"] == 16
    loaded_g = ConditionalGenerator.from_pretrained(tmp_path / "generator")
    loaded_d = ProjectionDiscriminator.from_pretrained(tmp_path / "discriminator")
    assert not loaded_g.training and not loaded_d.training
    latents = generator(z, labels)
    torch.testing.assert_close(loaded_g(z, labels), latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded_d(latents, labels), discriminator(latents, labels), rtol=0, atol=0)


def test_damaged_folders_are_one_line_naming_the_file_and_the_stage(tmp_path):
    folder = tmp_path / "generator"
    ConditionalGenerator((4, 8, 8), n_classes=10, z_dim=16, width=16).save_pretrained(folder)
    good_config = (folder / CONFIG_FILE).read_text()

    def error() -> str:
        with pytest.raises(ArtifactError) as caught:
            ConditionalGenerator.from_pretrained(folder)
        message = str(caught.value)
        assert "\n" not in message and message.endswith("rerun the 'train_gan' stage")
        return message

    (folder / CONFIG_FILE).write_text(good_config.replace('"width": 16', '"width": 32'))
    assert error().startswith(f"{folder}: the GAN generator cannot be loaded (Error(s) in loading state_dict")
    (folder / CONFIG_FILE).write_text('{"latent_shape": [4, 8, 8], "colour": "blue"}')
    assert error().startswith(f"{folder / CONFIG_FILE}: unexpected content (")
    (folder / CONFIG_FILE).write_text("{not json")
    assert error().startswith(f"{folder / CONFIG_FILE}: not valid JSON")
    (folder / CONFIG_FILE).write_text(good_config)
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    assert error().startswith(f"{folder / WEIGHTS_FILE}: not a readable safetensors file")
    (folder / WEIGHTS_FILE).unlink()
    assert error() == f"{folder / WEIGHTS_FILE}: missing from the GAN generator folder; rerun the 'train_gan' stage"
    with pytest.raises(ArtifactError, match="no GAN generator here; run the 'train_gan' stage first"):
        ConditionalGenerator.from_pretrained(tmp_path / "nowhere")
