import pytest
import torch
from torch import nn

from gmpipe.nn.discriminator import PatchDiscriminator


@pytest.mark.parametrize(
    ("channels", "size", "n_layers", "patches"),
    [(3, 32, 3, 2), (1, 28, 2, 5), (1, 32, 1, 14)],
)
def test_output_is_one_logit_per_patch(channels, size, n_layers, patches):
    discriminator = PatchDiscriminator(in_channels=channels, width=8, n_layers=n_layers)
    logits = discriminator(torch.zeros(2, channels, size, size))
    assert logits.shape == (2, 1, patches, patches)  # size / 2**L - 2


def test_weight_init():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(in_channels=3, width=32, n_layers=3)
    convs = [module for module in discriminator.modules() if isinstance(module, nn.Conv2d)]
    largest = max(convs, key=lambda conv: conv.weight.numel())
    assert largest.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(largest.weight.mean().item()) < 1e-3
    norms = [module for module in discriminator.modules() if isinstance(module, nn.GroupNorm)]
    assert len(norms) == 3
    assert all(norm.bias.abs().sum() == 0 for norm in norms)


def test_logits_of_a_sample_do_not_depend_on_the_rest_of_the_batch():
    # GroupNorm normalises each sample on its own (BatchNorm would mix real and fake images)
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(in_channels=1, width=8, n_layers=2).train()
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(discriminator(images)[:1], discriminator(images[:1]))


def test_no_norm_option_and_bad_arguments():
    discriminator = PatchDiscriminator(in_channels=1, width=8, n_layers=2, norm="none")
    assert not any(isinstance(module, nn.GroupNorm) for module in discriminator.modules())
    assert all(m.bias is not None for m in discriminator.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="batch")
    with pytest.raises(ValueError, match="n_layers"):
        PatchDiscriminator(n_layers=0)
