import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gmpipe.config.evaluate import EvaluateConfig
from gmpipe.nn.features import (
    FEATURE_BATCH_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EffNetLite0Features,
    load_state_dict_features,
    load_weights_file,
    preprocess_images,
)


def synthetic_images(count: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random blobs (count, channels, size, size) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, channels, 4, 4, generator=generator) * 2 - 1
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def effnet() -> EffNetLite0Features:
    return EffNetLite0Features(image_size=64)


def test_preprocess_repeats_grey_and_normalises():
    grey = synthetic_images(2, 1, 20)
    out = preprocess_images(grey, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, preprocess_images(grey.expand(-1, 3, -1, -1), 32, IMAGENET_MEAN, IMAGENET_STD))
    white = preprocess_images(torch.ones(1, 3, 8, 8), 8, IMAGENET_MEAN, IMAGENET_STD)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(white[0, :, 0, 0], expected)
    with pytest.raises(ValueError):
        preprocess_images(torch.zeros(1, 2, 8, 8), 8, IMAGENET_MEAN, IMAGENET_STD)


def test_effnet_gives_finite_pooled_features(effnet):
    grey, rgb = synthetic_images(5, 1, 28), synthetic_images(5, 3, 40, seed=1)
    features = effnet.extract(torch.cat([grey.expand(-1, 3, -1, -1), rgb[:, :, :28, :28]]), batch_size=4)
    assert features.shape == (10, 1280) and features.dtype == np.float64
    assert np.isfinite(features).all() and features.std(axis=0).max() > 0
    # Batching does not change the result, and grey input equals its 3-channel repeat.
    np.testing.assert_allclose(features[:5], effnet.extract(grey, batch_size=10), rtol=1e-4, atol=1e-5)
    assert effnet.extract(rgb).shape == (5, 1280)


def test_the_default_feature_batch_is_evaluates_and_gives_the_same_features(effnet):
    assert EvaluateConfig().feature_batch_size == FEATURE_BATCH_SIZE
    images = synthetic_images(FEATURE_BATCH_SIZE + 7, 1, 32, seed=2)  # two batches, the last one short
    np.testing.assert_allclose(effnet.extract(images), effnet.extract(images, batch_size=250), rtol=1e-4, atol=1e-5)


def test_effnet_stays_frozen_in_eval_mode(effnet):
    parent = nn.Sequential(effnet).train()
    assert not effnet.training and not effnet.network.training
    assert not any(p.requires_grad for p in parent.parameters())
    assert not effnet(synthetic_images(1, 3, 16)).requires_grad


def test_feature_maps_are_differentiable_in_the_input(effnet):
    images = synthetic_images(2, 1, 28).requires_grad_(True)
    maps = effnet.feature_maps(images)
    assert [m.shape[1] for m in maps] == [16, 24, 40, 112]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]
    sum(m.square().mean() for m in maps).backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_the_params_schema_names_the_networks_blocks(effnet):
    """train_decoder.perceptual_blocks is checked, torch-free, against the block count the network has."""
    from gmpipe.config.train_decoder import TrainDecoderConfig
    from gmpipe.nn.effnet_blocks import NUM_BLOCKS

    assert len(effnet.network._blocks) == NUM_BLOCKS
    TrainDecoderConfig(perceptual_blocks=[NUM_BLOCKS - 1])
    with pytest.raises(ValueError, match="perceptual_blocks"):
        TrainDecoderConfig(perceptual_blocks=[NUM_BLOCKS])
    assert EffNetLite0Features(map_blocks=[NUM_BLOCKS - 1]).map_blocks == (NUM_BLOCKS - 1,)
    assert tuple(TrainDecoderConfig().perceptual_blocks) == effnet.map_blocks  # one default for both


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        EffNetLite0Features(weights_path=tmp_path / "nowhere.pth")


class TinyFeatureNet(nn.Module):
    """Stand-in for a user's Inception-v3: images (B, 3, H, W) -> feature maps (B, 4, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class NotAStateDict:
    """A pickled object of this class must never be unpickled by the weights loader."""


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TinyFeatureNet().state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_features_load_local_weights(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = tiny_state()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    extractor = load_state_dict_features(TinyFeatureNet, path, image_size=12)
    torch.testing.assert_close(extractor.network.conv.weight, state["conv.weight"])
    features = extractor.extract(synthetic_images(3, 1, 20), batch_size=2)
    assert features.shape == (3, 4) and features.dtype == np.float64 and np.isfinite(features).all()


def test_pickled_objects_and_non_tensors_are_refused(tmp_path):
    torch.save(NotAStateDict(), tmp_path / "object.pt")
    with pytest.raises(ValueError, match="object.pt"):
        load_weights_file(tmp_path / "object.pt")
    torch.save({"conv.weight": "not a tensor"}, tmp_path / "strings.pt")
    with pytest.raises(ValueError, match="strings.pt"):
        load_weights_file(tmp_path / "strings.pt")


def test_mismatched_state_dict_is_refused(tmp_path):
    save_file({"other.weight": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="wrong.safetensors"):
        load_state_dict_features(TinyFeatureNet, tmp_path / "wrong.safetensors")


def test_folded_network_computes_the_library_networks_features_and_gradients(effnet):
    """The folded, channels-last network is the library's up to float rounding: pooled features, feature maps at
    every stride and their gradients in the images (the perceptual losses train through them)."""
    reference = EffNetLite0Features(image_size=64, folded=False)
    images = synthetic_images(6, 1, 32, seed=3)
    torch.testing.assert_close(effnet(images), reference(images), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in effnet.modules())

    grads = []
    for extractor in (effnet, reference):
        x = images.clone().requires_grad_(True)
        maps = extractor.feature_maps(x)
        sum(m.square().mean() for m in maps).backward()
        grads.append((maps, x.grad))
    for folded, library in zip(grads[0][0], grads[1][0], strict=True):
        torch.testing.assert_close(folded, library, rtol=1e-3, atol=1e-3)
    # ReLU6 units at their kinks make the input gradient sensitive to rounding: the library's own network differs
    # by ~0.3% (relative norm) between float32 and float64 on these images, so that is the scale to compare at.
    folded, library = grads[0][1], grads[1][1]
    assert (folded - library).norm() / library.norm() < 1e-2


@pytest.mark.parametrize("size", [31, 32, 33])
def test_folded_convolution_pads_as_tensorflow_same(size):
    """Stride 2 on odd and even sides (the odd pixel of padding goes at the end) and stride 1, k = 3 and 5."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    from gmpipe.nn.features import FoldedSameConv

    torch.manual_seed(size)
    x = torch.randn(2, 4, size, size)
    for kernel, stride, groups in [(3, 2, 1), (5, 2, 4), (3, 1, 4), (5, 1, 1)]:
        conv = Conv2dDynamicSamePadding(4, 4, kernel, stride=stride, groups=groups, bias=False)
        norm = nn.BatchNorm2d(4, eps=1e-3)
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        nn.init.uniform_(norm.weight, 0.5, 1.5), nn.init.uniform_(norm.bias, -0.5, 0.5)
        expected = norm.eval()(conv(x))
        torch.testing.assert_close(FoldedSameConv(conv, norm)(x), expected, rtol=1e-5, atol=1e-5)
