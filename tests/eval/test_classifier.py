import pytest
import torch

from gmpipe.errors import GmpipeError
from gmpipe.eval import classifier as classifier_module
from gmpipe.eval.classifier import (
    ClassifierConfig,
    SmallCNN,
    accuracy,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from tests.conftest import autocast_seen


def quadrant_task(count: int, seed: int, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy dark images (count, 1, size, size) in [-1, 1] with one bright quadrant; the label is the quadrant."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (count,), generator=generator)
    images = -0.6 + 0.3 * torch.randn(count, 1, size, size, generator=generator)
    half = size // 2
    for index, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[index, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 1.2
    return images.clamp(-1, 1), labels


@pytest.fixture(scope="module")
def trained() -> SmallCNN:
    images, labels = quadrant_task(256, seed=0)
    return train_classifier(images, labels, num_classes=4, steps=60, batch_size=32, lr=3e-3, seed=0, width=16)


def test_learns_separable_task(trained):
    images, labels = quadrant_task(200, seed=1)
    assert accuracy(trained, images, labels) > 0.9
    assert not trained.training


def test_training_is_seeded_and_leaves_global_rng_alone():
    images, labels = quadrant_task(64, seed=2)
    state = torch.random.get_rng_state()
    first = train_classifier(images, labels, num_classes=4, steps=3, batch_size=8, seed=5, width=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = train_classifier(images, labels, num_classes=4, steps=3, batch_size=8, seed=5, width=8)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_forward_passes_run_in_the_precision_asked_and_prediction_in_float32(precision, monkeypatch):
    images, labels = quadrant_task(256, seed=0)
    built = []

    class Watched(SmallCNN):
        def __init__(self, config):
            super().__init__(config)
            built.append(autocast_seen(self))

    monkeypatch.setattr(classifier_module, "SmallCNN", Watched)
    model = train_classifier(images, labels, num_classes=4, steps=60, batch_size=32, lr=3e-3, seed=0, width=16,
                             precision=precision)
    (seen,) = built
    assert seen == [precision == "bf16"] * 60
    seen.clear()
    test_images, test_labels = quadrant_task(200, seed=1)
    assert accuracy(model, test_images, test_labels) > 0.9  # bf16 learns the task as well
    assert seen and not any(seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_rgb_input_at_64_px():
    model = SmallCNN(ClassifierConfig(in_channels=3, num_classes=5, width=8))
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_save_and_load_round_trip(trained, tmp_path):
    save_classifier(trained, tmp_path / "classifier")
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_classifier(tmp_path / "classifier")
    assert loaded.config == trained.config
    images, _ = quadrant_task(16, seed=3)
    torch.testing.assert_close(loaded(images), trained(images))
    assert torch.equal(predict(loaded, images), predict(trained, images))


def test_loading_a_missing_directory_names_the_file(tmp_path):
    with pytest.raises(GmpipeError, match="config.json: missing from the classifier folder; rerun the 'evaluate'"):
        load_classifier(tmp_path)
