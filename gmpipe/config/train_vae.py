"""``train_vae:`` the KL autoencoder, its losses and the patch discriminator, and the loop that trains them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from gmpipe.config.base import ComposedSection
from gmpipe.config.loop import LoopConfig
from gmpipe.config.perceptual import PerceptualBlocks
from gmpipe.nn.effnet_blocks import DEFAULT_MAP_BLOCKS

Width = Annotated[int, Field(ge=1, le=4096)]


class TrainVAEConfig(ComposedSection):
    """The loop's keys (``loop``) are written flat beside the autoencoder's own.

    Architecture: ``block_out_channels`` has one width per resolution level; the downsampling factor is
    2 ** (levels - 1), so 32 px images with three levels give 8x8 latents of ``latent_channels``.

    Perceptual term (``perceptual_weight``; 0 turns it off): distances between the EfficientNet-Lite0 feature maps
    after its MBConv blocks ``perceptual_blocks`` at ``perceptual_image_size``, or true LPIPS (VGG-16 taps and
    learned heads) with ``lpips_backbone_weights``, which then fixes the layers: ``perceptual_blocks`` other than the
    default is an error."""

    flat_parts = ("loop",)

    loop: LoopConfig = LoopConfig()

    block_out_channels: Annotated[list[Width], Field(min_length=1, max_length=6)] = [32, 64, 64]
    latent_channels: Annotated[int, Field(ge=1, le=64)] = 4
    layers_per_block: Annotated[int, Field(ge=1, le=4)] = 1
    norm_num_groups: Annotated[int, Field(ge=1)] = 16
    mid_block_attention: bool = True

    rec_loss: Literal["l1", "l2"] = "l1"
    kl_weight: Annotated[float, Field(ge=0.0)] = 1e-6
    perceptual_weight: Annotated[float, Field(ge=0.0)] = 1.0
    perceptual_image_size: Annotated[int, Field(ge=16, le=512)] = 64
    perceptual_blocks: PerceptualBlocks = list(DEFAULT_MAP_BLOCKS)
    lpips_weights: str | None = None
    lpips_backbone_weights: str | None = None
    gan_weight: Annotated[float, Field(ge=0.0)] = 0.5
    gan_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_start: Annotated[int, Field(ge=0)] = 500
    disc_lr: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    disc_width: Annotated[int, Field(ge=4, le=512)] = 32
    disc_layers: Annotated[int, Field(ge=1, le=5)] = 2

    eval_images: Annotated[int, Field(ge=16)] = 2000

    @model_validator(mode="after")
    def _lpips_needs_its_backbone(self):
        # the heads without their trunk mean nothing; the trunk alone takes the heads of an installed lpips package
        if self.lpips_weights and not self.lpips_backbone_weights:
            raise ValueError("lpips_weights and lpips_backbone_weights go together (LPIPS heads + their VGG-16 trunk)")
        if self.lpips_backbone_weights and tuple(self.perceptual_blocks) != DEFAULT_MAP_BLOCKS:
            raise ValueError("perceptual_blocks names EfficientNet-Lite0 blocks; LPIPS (lpips_backbone_weights) "
                             "compares its own VGG-16 layers")
        return self

    @model_validator(mode="after")
    def _groups_divide_widths(self):
        bad = [w for w in self.block_out_channels if w % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups ({self.norm_num_groups}) must divide every block width (got {bad})")
        return self
