import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmpipe.nn.discriminator import PatchDiscriminator
from gmpipe.vae.gan import (
    D_LOSSES,
    G_LOSSES,
    adaptive_weight,
    disc_factor,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)


def test_hinge_losses_by_hand():
    logits_real = torch.tensor([2.0, 0.5])
    logits_fake = torch.tensor([-2.0, 0.5])
    # real: relu(1 - 2) = 0, relu(0.5) = 0.5 -> 0.25; fake: 0, relu(1.5) = 1.5 -> 0.75
    assert hinge_d_loss(logits_real, logits_fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert hinge_g_loss(logits_fake).item() == pytest.approx(0.75)


def test_non_saturating_losses_are_cross_entropies():
    generator = torch.Generator().manual_seed(0)
    logits_real = torch.randn(4, 1, 3, 3, generator=generator)
    logits_fake = torch.randn(4, 1, 3, 3, generator=generator)
    expected_d = 0.5 * (
        F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
        + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    )
    assert non_saturating_d_loss(logits_real, logits_fake).item() == pytest.approx(expected_d.item(), rel=1e-6)
    expected_g = -torch.sigmoid(logits_fake).log().mean()
    assert non_saturating_g_loss(logits_fake).item() == pytest.approx(expected_g.item(), rel=1e-5)


def test_adaptive_weight_matches_analytic_gradients():
    # x_hat = W h with W (1, 3): grad_W of a * sum(x_hat) is a * sum_b h_b, so the ratio is |a| / |b|
    # up to eps: lambda = |a| ||H|| / (|b| ||H|| + eps), H = sum_b h_b.
    last_layer = nn.Parameter(torch.tensor([[0.3, -0.2, 0.1]]))
    h = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    x_hat = h @ last_layer.T
    rec_loss = 3.0 * x_hat.sum()
    gan_loss = -0.5 * x_hat.sum()
    norm_h = h.sum(dim=0).norm().item()
    expected = 3.0 * norm_h / (0.5 * norm_h + 1e-4)
    weight = adaptive_weight(rec_loss, gan_loss, last_layer)
    assert weight.item() == pytest.approx(expected, rel=1e-6)
    assert not weight.requires_grad
    (rec_loss + weight * gan_loss).backward()  # graphs were retained for the caller's backward


def test_adaptive_weight_matches_autograd_by_hand_and_clamps():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5))
    x = torch.randn(3, 5)
    x_hat = decoder(torch.randn(3, 4))
    rec_loss = (x - x_hat).abs().sum()
    gan_loss = -x_hat.mean()
    last = decoder[2].weight
    rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last, retain_graph=True)[0]
    expected = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).item()
    assert adaptive_weight(rec_loss, gan_loss, last).item() == pytest.approx(expected, rel=1e-6)
    assert adaptive_weight(rec_loss, gan_loss, last, max_weight=0.01).item() == pytest.approx(0.01)
    vanishing_gan = 1e-12 * gan_loss
    assert adaptive_weight(rec_loss, vanishing_gan, last).item() == pytest.approx(1e4)


def test_disc_factor_switches_on_at_disc_start():
    assert [disc_factor(step, 3) for step in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert disc_factor(0, 0) == 1.0


def _fixed_discriminator():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(in_channels=1, width=8, n_layers=2)
    discriminator.requires_grad_(False)
    return discriminator


@pytest.mark.parametrize("kind", sorted(G_LOSSES))
def test_generator_loss_pushes_fake_logits_up(kind):
    discriminator = _fixed_discriminator()
    torch.manual_seed(1)
    toy_generator = nn.Sequential(nn.Linear(8, 16 * 16), nn.Tanh(), nn.Unflatten(1, (1, 16, 16)))
    z = torch.randn(4, 8)
    optimizer = torch.optim.Adam(toy_generator.parameters(), lr=1e-2)
    with torch.no_grad():
        before = discriminator(toy_generator(z)).mean().item()
    for _ in range(10):
        optimizer.zero_grad()
        G_LOSSES[kind](discriminator(toy_generator(z))).backward()
        optimizer.step()
    with torch.no_grad():
        after = discriminator(toy_generator(z)).mean().item()
    assert after > before


@pytest.mark.parametrize("kind", sorted(D_LOSSES))
def test_discriminator_loss_moves_real_and_fake_logits_apart(kind):
    torch.manual_seed(2)
    discriminator = PatchDiscriminator(in_channels=1, width=8, n_layers=2)
    real = (0.5 + 0.1 * torch.randn(4, 1, 16, 16)).clamp(-1, 1)
    fake = (-0.5 + 0.1 * torch.randn(4, 1, 16, 16)).clamp(-1, 1)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)

    def gap():
        with torch.no_grad():
            return (discriminator(real).mean() - discriminator(fake).mean()).item()

    before = gap()
    for _ in range(10):
        optimizer.zero_grad()
        D_LOSSES[kind](discriminator(real), discriminator(fake)).backward()
        optimizer.step()
    assert gap() > before + 0.1
