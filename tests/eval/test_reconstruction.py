import math

import pytest
import torch

from gmpipe.eval.reconstruction import gaussian_window, psnr, psnr_per_image, ssim, ssim_per_image


def images(seed: int = 0, shape=(4, 3, 28, 28)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def noisy(x: torch.Tensor, scale: float, seed: int = 1) -> torch.Tensor:
    return x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_of_identical_images_is_infinite():
    x = images()
    assert psnr(x, x) == math.inf


def test_psnr_matches_hand_computation_for_constant_offset():
    x = images().double()  # float64 so the offset itself is not rounded
    # An offset of 0.2 on [-1, 1] is 0.1 on [0, 1]: MSE 0.01, PSNR 10 log10(1 / 0.01) = 20 dB.
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=1e-9)
    per_image = psnr_per_image(x, torch.cat([x[:2] + 0.2, x[2:] - 0.02]))
    torch.testing.assert_close(per_image, torch.tensor([20.0, 20.0, 40.0, 40.0], dtype=torch.float64))


def test_gaussian_window_is_normalised_and_symmetric():
    window = gaussian_window()
    assert window.shape == (11, 11)
    assert window.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(window, window.T)
    assert window.argmax().item() == 5 * 11 + 5


def test_ssim_of_identical_images_is_one():
    x = images()
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_noise():
    x = images()
    scores = [ssim(x, noisy(x, scale)) for scale in (0.02, 0.1, 0.4)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_of_constant_images_matches_closed_form():
    # Flat images have no variance, so SSIM reduces to the luminance term (2 a b + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.25, 0.75, 0.01**2
    x = torch.full((1, 1, 16, 16), 2 * a - 1)
    y = torch.full((1, 1, 16, 16), 2 * b - 1)
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_is_symmetric_and_per_image():
    x = images(shape=(3, 1, 32, 32))
    y = noisy(x, 0.2)
    torch.testing.assert_close(ssim_per_image(x, y), ssim_per_image(y, x))
    assert ssim_per_image(x, y).shape == (3,)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        psnr(images(), images(shape=(4, 3, 28, 27)))
    with pytest.raises(ValueError):
        ssim(images(shape=(1, 1, 8, 8)), images(shape=(1, 1, 8, 8)))
