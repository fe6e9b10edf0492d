"""The shared adversarial losses and R1 against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from gmpipe.gan.losses import (
    D_LOSSES,
    G_LOSSES,
    LOSS_KINDS,
    check_loss_kind,
    hinge_d_loss,
    hinge_g_loss,
    minimax_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
    r1_penalty,
)

LOGITS_REAL = [2.0, -1.0]
LOGITS_FAKE = [0.5, -3.0]


def _d(logit: float) -> float:
    """D = sigmoid(logit), the probability of 'real'."""
    return 1.0 / (1.0 + math.exp(-logit))


def _mean(values) -> float:
    return sum(values) / len(values)


def test_cross_entropy_discriminator_loss_by_hand():
    # -1/2 (mean log D(x) + mean log(1 - D(G(z)))): real terms 0.126928, 1.313262; fake terms 0.974077, 0.048587
    expected = -0.5 * (_mean([math.log(_d(v)) for v in LOGITS_REAL])
                       + _mean([math.log(1 - _d(v)) for v in LOGITS_FAKE]))
    assert expected == pytest.approx(0.615714, abs=1e-6)
    value = non_saturating_d_loss(torch.tensor(LOGITS_REAL), torch.tensor(LOGITS_FAKE)).item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert D_LOSSES["minimax"] is D_LOSSES["non_saturating"] is non_saturating_d_loss  # one D side, two G sides


def test_minimax_generator_loss_by_hand():
    # G minimizes mean log(1 - D(G(z))) = (log(1 - sigmoid(0.5)) + log(1 - sigmoid(-3))) / 2 = -0.511332
    expected = _mean([math.log(1 - _d(v)) for v in LOGITS_FAKE])
    assert expected == pytest.approx(-0.511332, abs=1e-6)
    assert minimax_g_loss(torch.tensor(LOGITS_FAKE)).item() == pytest.approx(expected, rel=1e-6)


def test_non_saturating_generator_loss_by_hand():
    # G maximizes mean log D(G(z)): loss (-log sigmoid(0.5) - log sigmoid(-3)) / 2 = (0.474077 + 3.048587) / 2
    expected = -_mean([math.log(_d(v)) for v in LOGITS_FAKE])
    assert expected == pytest.approx(1.761332, abs=1e-6)
    assert non_saturating_g_loss(torch.tensor(LOGITS_FAKE)).item() == pytest.approx(expected, rel=1e-6)


def test_hinge_losses_by_hand():
    # D: 1/2 (mean(relu(1 - 2), relu(1 + 1)) + mean(relu(1 + 0.5), relu(1 - 3))) = 1/2 (1 + 0.75)
    assert hinge_d_loss(torch.tensor(LOGITS_REAL), torch.tensor(LOGITS_FAKE)).item() == pytest.approx(0.875)
    # G: -mean(0.5, -3) = 1.25
    assert hinge_g_loss(torch.tensor(LOGITS_FAKE)).item() == pytest.approx(1.25)


def test_losses_average_over_every_logit_of_any_shape():
    patch = torch.tensor(LOGITS_FAKE * 3).view(2, 1, 1, 3)  # PatchGAN-shaped: a mean over all 6 logits
    for kind in LOSS_KINDS:
        assert G_LOSSES[kind](patch).item() == pytest.approx(G_LOSSES[kind](torch.tensor(LOGITS_FAKE)).item())


def _grad(loss_fn, logits: list[float]) -> torch.Tensor:
    tensor = torch.tensor(logits, requires_grad=True)
    loss_fn(tensor).backward()
    return tensor.grad


def test_generator_gradients_by_hand_and_the_saturation_of_minimax():
    logits = [0.5, -3.0, -10.0]
    n = len(logits)
    minimax = _grad(minimax_g_loss, logits)
    non_saturating = _grad(non_saturating_g_loss, logits)
    hinge = _grad(hinge_g_loss, logits)
    assert minimax.shape == non_saturating.shape == hinge.shape == (n,)
    # every G loss pushes the fake logits up (negative gradient)
    torch.testing.assert_close(minimax, torch.tensor([-_d(v) / n for v in logits]))
    torch.testing.assert_close(non_saturating, torch.tensor([-(1 - _d(v)) / n for v in logits]))
    torch.testing.assert_close(hinge, torch.full((n,), -1.0 / n))
    # where D confidently rejects the fake (logit -10), minimax's gradient vanishes, the non-saturating one stays
    assert abs(minimax[2]) < 1e-4 * abs(non_saturating[2])
    assert non_saturating[2] == pytest.approx(-1 / n, rel=1e-4)


def test_discriminator_gradients_push_real_up_and_fake_down():
    real = torch.tensor([2.0, -1.0], requires_grad=True)
    fake = torch.tensor([0.5, -3.0], requires_grad=True)
    non_saturating_d_loss(real, fake).backward()
    torch.testing.assert_close(real.grad, torch.tensor([-0.5 * (1 - _d(v)) / 2 for v in LOGITS_REAL]))
    torch.testing.assert_close(fake.grad, torch.tensor([0.5 * _d(v) / 2 for v in LOGITS_FAKE]))
    real.grad, fake.grad = None, None
    hinge_d_loss(real, fake).backward()
    # the hinge is flat beyond the margins: real logit 2 > 1 and fake logit -3 < -1 get no gradient
    torch.testing.assert_close(real.grad, torch.tensor([0.0, -0.25]))
    torch.testing.assert_close(fake.grad, torch.tensor([0.25, 0.0]))


def test_losses_stay_finite_at_extreme_logits():
    extreme = torch.tensor([-100.0, 100.0])
    for kind in LOSS_KINDS:
        assert torch.isfinite(D_LOSSES[kind](extreme, extreme)) and torch.isfinite(G_LOSSES[kind](extreme))


def test_the_three_kinds_and_a_clear_error_for_others():
    assert set(D_LOSSES) == set(G_LOSSES) == set(LOSS_KINDS) == {"minimax", "non_saturating", "hinge"}
    with pytest.raises(ValueError, match="unknown GAN loss 'wasserstein'; choose one of minimax"):
        check_loss_kind("wasserstein")


def test_the_autoencoder_uses_the_same_losses():
    from gmpipe.vae import gan as vae_gan

    assert vae_gan.D_LOSSES is D_LOSSES and vae_gan.G_LOSSES is G_LOSSES
    assert vae_gan.hinge_d_loss is hinge_d_loss and vae_gan.non_saturating_g_loss is non_saturating_g_loss


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
    # D(x) = <w, x> + b: grad_x D = w for every sample, so R1 = gamma / 2 ||w||^2 = 0.75 * (1 + 4 + 0.25 + 9)
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    x = torch.randn(5, 2, 2, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2)) + 0.7
    assert r1_penalty(logits, x, gamma=1.5).item() == pytest.approx(0.75 * 14.25)


def test_r1_of_a_quadratic_discriminator_by_hand():
    # D(x) = 1/2 x^T A x, A = diag(2, 3): grad = A x; x1 = (1, 2) -> (2, 6), |.|^2 = 40; x2 = (0, -1) -> 9
    # R1 = gamma / 2 * mean(40, 9) = 0.25 * 24.5 with gamma = 0.5
    a = torch.tensor([2.0, 3.0])
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    logits = 0.5 * (a * x.square()).sum(dim=1)
    assert r1_penalty(logits, x, gamma=0.5).item() == pytest.approx(6.125)


def test_r1_reaches_the_discriminator_parameters():
    # D(x) = s / 2 |x|^2: R1 = gamma / 2 s^2 mean|x|^2 and dR1/ds = gamma s mean|x|^2; mean|x|^2 = (5 + 1) / 2
    s = torch.tensor(2.0, requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    penalty = r1_penalty(0.5 * s * x.square().sum(dim=1), x, gamma=0.5)
    assert penalty.item() == pytest.approx(0.25 * 4 * 3)
    penalty.backward()
    assert s.grad.item() == pytest.approx(0.5 * 2 * 3)


def test_r1_sums_patch_logits_per_sample():
    # patch logits l_hw = w x_hw on a (1, 2, 2) input: the per-sample logit sum has gradient w everywhere,
    # |grad|^2 = 4 w^2 = 36 for w = 3, R1 = 1/2 * 36 with gamma = 1
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    assert r1_penalty(3.0 * x, x, gamma=1.0).item() == pytest.approx(18.0)


def test_r1_needs_an_input_that_requires_grad():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.sum(dim=1), x, gamma=1.0)
