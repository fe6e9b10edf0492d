import pytest
import torch
from torch import nn

from gmpipe.nn.autoencoder import build_autoencoder_preset, decoder_last_layer
from gmpipe.nn.discriminator import PatchDiscriminator
from gmpipe.vae.autoencoder_loss import AutoencoderLoss
from gmpipe.vae.elbo import kl_divergence
from gmpipe.vae.gan import adaptive_weight, hinge_d_loss
from gmpipe.vae.perceptual import PerceptualLoss

GENERATOR_KEYS = {
    "total",
    "nll",
    "kl",
    "reconstruction",
    "perceptual",
    "gan",
    "adaptive_weight",
    "disc_factor",
    "logvar",
}


class ToyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def feature_maps(self, images):
        return [self.conv(images)]


class CountingDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = PatchDiscriminator(in_channels=1, width=8, n_layers=2)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.inner(images)


def _setup(disc_start=2, **settings):
    torch.manual_seed(0)
    vae = build_autoencoder_preset("tiny", 1)
    loss = AutoencoderLoss(
        kl_weight=0.01,
        perceptual_weight=0.5,
        disc_start=disc_start,
        learned_logvar=True,
        perceptual_loss=PerceptualLoss(ToyFeatures()),
        **settings,
    )
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample()).sample
    return vae, loss, x, posterior, x_hat


def test_before_disc_start_only_the_elbo_and_perceptual_terms_count():
    vae, loss, x, posterior, x_hat = _setup(disc_start=2)
    discriminator = CountingDiscriminator()
    total, terms = loss.generator_loss(
        x, posterior.mean, posterior.logvar, x_hat, discriminator, step=1, last_layer=decoder_last_layer(vae)
    )
    assert discriminator.calls == 0
    assert set(terms) == GENERATOR_KEYS
    assert all(not value.requires_grad for value in terms.values())
    assert terms["gan"].item() == terms["adaptive_weight"].item() == terms["disc_factor"].item() == 0.0
    kl = kl_divergence(posterior.mean, posterior.logvar)
    assert total.item() == pytest.approx((terms["nll"] + 0.01 * kl).item(), rel=1e-5)
    assert terms["perceptual"].item() > 0

    total.backward()
    assert loss.elbo.logvar.grad is not None
    assert decoder_last_layer(vae).grad is not None


def test_after_disc_start_the_gan_term_uses_the_adaptive_weight():
    vae, loss, x, posterior, x_hat = _setup(disc_start=2)
    discriminator = CountingDiscriminator()
    last_layer = decoder_last_layer(vae)
    total, terms = loss.generator_loss(
        x, posterior.mean, posterior.logvar, x_hat, discriminator, step=2, last_layer=last_layer
    )
    assert discriminator.calls == 1
    assert terms["disc_factor"].item() == 1.0
    # the same weight computed by hand from the nll and the hinge generator loss
    perceptual = 0.5 * loss.perceptual.distance(x, x_hat)
    nll = loss.elbo(x, x_hat, posterior.mean, posterior.logvar, perceptual).nll
    gan = -discriminator(x_hat).mean()
    expected_weight = adaptive_weight(nll, gan, last_layer)
    assert terms["adaptive_weight"].item() == pytest.approx(expected_weight.item(), rel=1e-4)
    assert terms["gan"].item() == pytest.approx(gan.item(), rel=1e-5)
    expected_total = terms["nll"] + 0.01 * terms["kl"] + expected_weight * 0.5 * gan
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-4)
    total.backward()


def test_the_adaptive_loss_has_the_gradient_of_l_g_with_one_backward_per_network():
    """The returned loss back-propagates the perceptual network and the discriminator once, yet its gradient is
    that of L_G = nll + w_KL KL + lambda w_GAN L_adv built the plain way (lambda from the two losses, then L_G's
    backward) for every autoencoder parameter and the learned log-variance, in float64 so that only the maths is
    compared."""
    vae, loss, x, _, _ = _setup(disc_start=0)
    vae, loss, x = vae.double(), loss.double(), x.double()
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample()).sample
    discriminator = CountingDiscriminator().double()
    last_layer = decoder_last_layer(vae)
    backward_calls = {"features": 0, "discriminator": 0}

    def count(name):
        def hook(module, grad_input, grad_output):
            backward_calls[name] += 1
        return hook

    loss.perceptual.extractor.conv.register_full_backward_hook(count("features"))
    discriminator.inner.register_full_backward_hook(count("discriminator"))
    total, terms = loss.generator_loss(x, posterior.mean, posterior.logvar, x_hat, discriminator, 0, last_layer)
    trained = [*vae.parameters(), loss.elbo.logvar]
    fast = torch.autograd.grad(total, trained, allow_unused=True, retain_graph=True)
    assert backward_calls == {"features": 1, "discriminator": 1}

    perceptual = 0.5 * loss.perceptual.distance(x, x_hat)
    elbo = loss.elbo(x, x_hat, posterior.mean, posterior.logvar, perceptual)
    gan = -discriminator(x_hat).mean()
    plain = elbo.loss + adaptive_weight(elbo.nll, gan, last_layer) * 0.5 * gan
    assert total.item() == pytest.approx(plain.item(), rel=1e-5)
    reference = torch.autograd.grad(plain, trained, allow_unused=True)
    compared = 0
    for got, want in zip(fast, reference, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            compared += 1
    assert compared == len(trained)


def test_without_last_layer_the_gan_weight_is_fixed_and_without_grad_it_is_zero():
    vae, loss, x, posterior, x_hat = _setup(disc_start=0)
    discriminator = CountingDiscriminator()
    _, terms = loss.generator_loss(x, posterior.mean, posterior.logvar, x_hat, discriminator, step=0)
    assert terms["adaptive_weight"].item() == 1.0
    with torch.no_grad():
        total, terms = loss.generator_loss(
            x, posterior.mean, posterior.logvar, x_hat, discriminator, 0, decoder_last_layer(vae)
        )
    assert terms["adaptive_weight"].item() == 0.0 and terms["gan"].item() != 0.0
    assert total.item() == pytest.approx((terms["nll"] + 0.01 * terms["kl"]).item(), rel=1e-5)


def test_discriminator_loss():
    vae, loss, x, _, x_hat = _setup(disc_start=2)
    discriminator = CountingDiscriminator()
    before, terms = loss.discriminator_loss(x, x_hat.detach(), discriminator, step=0)
    assert before.item() == 0.0 and terms["discriminator"].item() > 0
    before.backward()  # a zero loss that still back-propagates

    after, terms = loss.discriminator_loss(x, x_hat, discriminator, step=2)
    expected = hinge_d_loss(discriminator(x), discriminator(x_hat))
    assert after.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"discriminator", "logits_real", "logits_fake", "disc_factor"}
    after.backward()
    assert all(parameter.grad is not None for parameter in discriminator.parameters())
    # reconstructions are detached even when passed with their graph: the autoencoder gets nothing
    assert all(parameter.grad is None for parameter in vae.parameters())


def test_settings_switch_parts_off_and_are_checked():
    loss = AutoencoderLoss(perceptual_weight=0.0, gan_weight=0.0, learned_logvar=False)
    assert loss.perceptual is None and not loss.discriminator_active(10**6)
    assert list(loss.parameters()) == []
    x = torch.zeros(1, 1, 4, 4)
    _, terms = loss.generator_loss(x, torch.zeros(1, 2), torch.zeros(1, 2), x + 0.5, None, step=5)
    assert "logvar" not in terms and terms["gan"].item() == 0.0
    assert terms["nll"].item() == pytest.approx(0.5 * 16)
    with pytest.raises(ValueError, match="gan_loss"):
        AutoencoderLoss(gan_loss="wasserstein", perceptual_weight=0.0)
    with pytest.raises(ValueError, match="l1"):
        AutoencoderLoss(rec_kind="huber", perceptual_weight=0.0)


def test_non_saturating_generator_term():
    vae, loss, x, posterior, x_hat = _setup(disc_start=0, gan_loss="non_saturating")
    discriminator = CountingDiscriminator()
    _, terms = loss.generator_loss(x, posterior.mean, posterior.logvar, x_hat, discriminator, step=0)
    expected = torch.nn.functional.softplus(-discriminator(x_hat)).mean()
    assert terms["gan"].item() == pytest.approx(expected.item(), rel=1e-6)
