"""A segmenter per regime: what takes a batch's inputs to logits, and what it trains.

``head`` works on cached patch tokens and owns no backbone at all, which is how head
training is guaranteed never to run the backbone. ``lora`` and ``fullft`` wrap the
backbone and the head and take tile pixels. A family whose builder is a whole segmenter
(``Family.segmenter``: the U-Net) is used as it is, every parameter trainable.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from em_foundation.alignment.features import FeatureStandardiser
from em_foundation.backbones import build_backbone, load
from em_foundation.backbones.frame import frame_to_native
from em_foundation.backbones.lora import add_lora, make_fully_trainable
from em_foundation.families import family_of
from em_foundation.heads import DeconvHead
from em_foundation.heads.deconv import up_blocks_for
from em_foundation.regimes import regime_of


def framed_head(head: DeconvHead, grid: torch.Tensor, out_size: tuple[int, int], frame: int | None) -> torch.Tensor:
    """The head's logits at ``out_size``; from a padded SAM frame's grid, made over the frame and
    then cropped and resized back (segment-anything's postprocess_masks), never stretched."""
    if frame is None:
        return head(grid, out_size)
    return frame_to_native(head(grid, (frame, frame)), tuple(out_size), frame)


class CachedFeatureSegmenter(nn.Module):
    """Head on cached tokens (float16 on disk, float32 here).

    ``input_mean`` / ``input_scale`` (per channel, from the training tokens) standardise the
    tokens first when given; they travel with the model, so evaluation uses the same ones.
    ``input_frame``: the tokens are of SAM's padded square frame (the cache's ``input_frame``),
    so logits are made over the frame and mapped back to the tile (backbones/frame.py).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        patch_size: int,
        input_mean: Sequence[float] | None = None,
        input_scale: Sequence[float] | None = None,
        input_frame: int | None = None,
    ) -> None:
        super().__init__()
        self.head = DeconvHead(in_channels, width, up_blocks=up_blocks_for(patch_size))
        self.input_frame = input_frame
        self.standardiser: FeatureStandardiser | None = None
        if input_mean is not None:
            if input_scale is None or len(input_mean) != in_channels or len(input_scale) != in_channels:
                raise ValueError(
                    f"input standardisation needs a mean and a scale for each of the {in_channels} channels"
                )
            self.standardiser = FeatureStandardiser(input_mean, input_scale)

    def forward(self, tokens: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        tokens = tokens.float() if self.standardiser is None else self.standardiser(tokens)
        return framed_head(self.head, tokens, out_size, self.input_frame)


class BackboneSegmenter(nn.Module):
    """Backbone (with adapters, or fully trainable) followed by the head, on pixels."""

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DeconvHead(backbone.embed_dim, width, up_blocks=up_blocks_for(backbone.patch_size))

    def forward(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        grid = self.backbone(images).grid.float()
        return framed_head(self.head, grid, out_size, getattr(self.backbone, "input_frame", None))

    def train(self, mode: bool = True) -> "BackboneSegmenter":
        # The backbone's own normalisation layers keep their pretrained behaviour.
        super().train(mode)
        self.backbone.eval()
        return self


def build_segmenter(
    regime: str,
    backbone_spec: dict[str, Any],
    head: dict[str, Any],
    lora: dict[str, Any],
    in_channels: int | None = None,
    patch_size: int | None = None,
    input_standardisation: dict[str, list[float]] | None = None,
    input_frame: int | None = None,
) -> nn.Module:
    """The segmenter of a regime; ``head`` needs the cache's channel count and patch size
    (and its ``input_frame``, where the tokens are of SAM's padded frame).

    ``input_standardisation`` ({"mean": [...], "scale": [...]}) only applies to ``head``.
    """
    spec = regime_of(regime)
    family = family_of(backbone_spec["family"]) if backbone_spec else None
    if family is not None and regime not in family.regimes:
        raise ValueError(f"family {family.name!r} does not run regime {regime!r}; it runs {', '.join(family.regimes)}")
    if family is not None and family.segmenter:
        return load(family.builder)(backbone_spec)
    if "head" not in spec.trains:
        raise ValueError(f"regime {regime!r} has no torch segmenter")
    if spec.cached:
        if in_channels is None or patch_size is None:
            raise ValueError(f"the {regime} regime needs the cached features' channel count and patch size")
        stats = input_standardisation or {}
        return CachedFeatureSegmenter(
            in_channels, head["width"], patch_size, stats.get("mean"), stats.get("scale"), input_frame
        )
    backbone = build_backbone(backbone_spec)
    if "adapters" in spec.trains:
        backbone = add_lora(backbone, lora["rank"], lora["alpha"], lora["dropout"])
    if "backbone" in spec.trains:
        backbone = make_fully_trainable(backbone)
    return BackboneSegmenter(backbone, head["width"])
