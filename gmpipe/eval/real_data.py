"""What every model is measured against, from the prepared data alone: the real test images' features, the train
images' features at each n of the real-data floor (and those of the autoencoder's own test and train choice), and
the classifier trained on the train split with its accuracy
on the whole test split.

None of it depends on a trained model, so it is kept across runs by content (``gmpipe.content_cache``), keyed by
the bytes of the prepared train and test splits, the settings that shape it (seed, counts, feature image size,
classifier steps and batch size), the code that computes it (this module and every gmpipe module it imports), the
feature network's weights and the torch and feature-network library versions, and the device type. The batch size
the features are computed in is not in the key: an image's features are its own (up to float rounding).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gmpipe.config.base import Precision
from gmpipe.content_cache import ContentCache
from gmpipe.data.prepared import Split
from gmpipe.eval.autoencoder import autoencoder_selection
from gmpipe.eval.classifier import ClassifierConfig, SmallCNN, accuracy, train_classifier
from gmpipe.fingerprint import Fingerprint, code_hashes, hash_file
from gmpipe.nn.features import EffNetLite0Features, efficientnet_lite0_weights_path
from gmpipe.pixels import uint8_to_signed


@dataclass(frozen=True)
class RealSelection:
    """Which real images are used: ``test_order`` (n_reference,) indexes the test split (reference image i is
    ``test[test_order[i]]``); ``floor_orders`` maps each floor n to the indexes (n,) of its train images;
    ``autoencoder`` the test and train images of the autoencoder's metrics
    (``gmpipe.eval.autoencoder.autoencoder_selection``)."""

    test_order: np.ndarray
    floor_orders: dict[int, np.ndarray]
    autoencoder: tuple[np.ndarray, np.ndarray]


def select_real(seed: int, n_test: int, n_train: int, n_reference: int, floor_ns: set[int],
                n_autoencoder: int) -> RealSelection:
    """A seeded choice: a permutation of the test split cut to ``n_reference``, then one permutation of the train
    split per floor n (ascending), cut to n, all from one generator seeded with ``seed``; and the autoencoder's
    own choice of ``n_autoencoder`` test and train images."""
    rng = np.random.default_rng(seed)
    test_order = rng.permutation(n_test)[:n_reference]
    return RealSelection(test_order, {n: rng.permutation(n_train)[:n] for n in sorted(floor_ns)},
                         autoencoder_selection(n_test, n_train, n_autoencoder, seed))


def data_hashes(prepared: Path) -> dict[str, str]:
    """SHA-256 of the prepared splits these results read (train and test), by their names under the data folder."""
    return {f"{prepared.name}/{split}.npz": hash_file(prepared / f"{split}.npz") for split in ("train", "test")}


def _fingerprint(settings: dict, data: dict[str, str], device: torch.device) -> Fingerprint:
    versions = {f"version.{package}": importlib.metadata.version(package)
                for package in ("torch", "efficientnet_lite_pytorch")}
    return Fingerprint({**settings, **versions, "device": device.type}, {**data, **code_hashes(__name__)})


@dataclass(frozen=True)
class RealFeatures:
    """EfficientNet-Lite0 features (float64) of the selected test images (n_reference, D), per floor n of the
    selected train images (n, D), and of the autoencoder's test and train images (each (n_autoencoder, D));
    ``cached``: whether they came from the cache."""

    test: np.ndarray
    floor: dict[int, np.ndarray]
    autoencoder: tuple[np.ndarray, np.ndarray]
    cached: bool


def real_features(extractor: EffNetLite0Features, train: Split, test: Split, selection: RealSelection,
                  data: dict[str, str], seed: int, batch_size: int, device: torch.device,
                  cache: ContentCache) -> RealFeatures:
    """The features of the selected real images (``RealFeatures``), from ``cache`` when it holds them."""
    weights = hash_file(efficientnet_lite0_weights_path())
    fingerprint = _fingerprint({"evaluate.seed": seed, "evaluate.feature_image_size": extractor.image_size,
                                "n_reference": len(selection.test_order),
                                "floor_n": sorted(selection.floor_orders),
                                "n_autoencoder": len(selection.autoencoder[0])},
                               {**data, "efficientnet-lite0 weights": weights}, device)

    def compute() -> dict[str, torch.Tensor]:
        tensors = {"test": extractor.extract(uint8_to_signed(test.images[selection.test_order]), batch_size,
                                             progress=True)}
        for n, order in selection.floor_orders.items():
            tensors[f"floor_{n}"] = extractor.extract(uint8_to_signed(train.images[order]), batch_size)
        test_index, train_index = selection.autoencoder
        tensors["autoencoder_test"] = extractor.extract(uint8_to_signed(test.images[test_index]), batch_size)
        tensors["autoencoder_train"] = extractor.extract(uint8_to_signed(train.images[train_index]), batch_size)
        # float32, as the network computed them (its float64 output is widened float32: nothing is lost)
        return {name: torch.from_numpy(np.ascontiguousarray(array)).float() for name, array in tensors.items()}

    lengths = {"test": len(selection.test_order), **{f"floor_{n}": n for n in selection.floor_orders},
               "autoencoder_test": len(selection.autoencoder[0]), "autoencoder_train": len(selection.autoencoder[1])}
    names = set(lengths)

    def fits(tensors: dict[str, torch.Tensor]) -> bool:
        return set(tensors) == names and all(tensors[name].ndim == 2 and len(tensors[name]) == lengths[name]
                                             for name in names)

    tensors, cached = cache.get_or_compute("real_features", fingerprint, compute, fits)
    return RealFeatures(tensors["test"].double().numpy(),
                        {n: tensors[f"floor_{n}"].double().numpy() for n in selection.floor_orders},
                        (tensors["autoencoder_test"].double().numpy(), tensors["autoencoder_train"].double().numpy()),
                        cached)


@dataclass(frozen=True)
class RealClassifier:
    """The classifier (eval mode, on the device), its accuracy on the whole test split and that split's size;
    ``cached``: whether it came from the cache."""

    model: SmallCNN
    test_accuracy: float
    test_n: int
    cached: bool


def real_classifier(train: Split, test: Split, num_classes: int, steps: int, batch_size: int, seed: int,
                    data: dict[str, str], device: torch.device, cache: ContentCache,
                    progress: bool = False, precision: Precision = "fp32") -> RealClassifier:
    """``train_classifier`` on the train split (forward passes in ``precision``) and its accuracy on the test split,
    from ``cache`` when it holds them."""
    fingerprint = _fingerprint({"evaluate.seed": seed, "evaluate.classifier_steps": steps,
                                "evaluate.classifier_batch_size": batch_size, "num_classes": num_classes,
                                "evaluate.classifier_precision": precision}, data, device)
    config = ClassifierConfig(in_channels=train.images.shape[1], num_classes=num_classes)

    def compute() -> dict[str, torch.Tensor]:
        model = train_classifier(uint8_to_signed(train.images), torch.from_numpy(train.labels), num_classes,
                                 steps=steps, batch_size=batch_size, seed=seed, progress=progress,
                                 width=config.width, device=device, precision=precision)
        test_accuracy = accuracy(model, uint8_to_signed(test.images), torch.from_numpy(test.labels))
        return {**{f"model.{name}": value for name, value in model.state_dict().items()},
                "test_accuracy": torch.tensor(test_accuracy, dtype=torch.float64)}

    def fits(tensors: dict[str, torch.Tensor]) -> bool:
        accuracy_tensor = tensors.get("test_accuracy")
        return accuracy_tensor is not None and accuracy_tensor.numel() == 1 and _rebuild(config, tensors) is not None

    tensors, cached = cache.get_or_compute("classifier", fingerprint, compute, fits)
    return RealClassifier(_rebuild(config, tensors).to(device), float(tensors["test_accuracy"]), len(test.labels),
                          cached)


def _rebuild(config: ClassifierConfig, tensors: dict[str, torch.Tensor]) -> SmallCNN | None:
    """The classifier whose weights are the ``model.*`` tensors (eval mode, CPU), or None if they do not fit it."""
    model = SmallCNN(config)
    state = {name.removeprefix("model."): value for name, value in tensors.items() if name.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError:
        return None
    return model.eval()
