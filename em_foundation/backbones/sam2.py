"""SAM2's Hiera image encoder (trunk) through timm (``sam2_hiera_{tiny,small,base_plus,large}``).

Hiera is hierarchical: a stride-4 convolutional stem, then four stages at strides 4, 8, 16
and 32, each halving the grid by pooling its queries. The stride-16 stage is the patch
grid here (``patch_size`` 16, as SAM's ViT and DINOv3): it holds most of the blocks
(ViT-like depth: 7, 11, 16 or 36 of them) and its grid matches the other families' at
patch 16. The stride-32 stage is removed, so it is neither counted nor trained; SAM2's FPN
neck is not part of timm's trunk, so the features are the trunk's tokens.

``layers`` index the blocks of the stride-16 stage (negative from its end; default its
last block), so multi-level features share one grid. Preprocessing is SAM2's: ImageNet's
mean/std on [0, 1] pixels. Hiera's positional embedding is a global embedding resampled to
the grid plus a window embedding tiled over it, which needs the stem's grid to be a
multiple of the first window (8 tokens): inputs are padded at the bottom and right to a
multiple of 32 pixels (SAM2 pads to its 1024 square the same way) and the grid is cropped
back to H/16 x W/16, so any multiple of 16 is accepted.

Weights: ``pretrained`` (timm's hub copy of SAM2's trunk: ``.fb_r896`` SAM2, ``_2pt1``
SAM2.1), ``random`` (``options.init_seed``) or a file: SAM2's own checkpoint (the trunk under
``image_encoder.trunk.``, beside SAM2's other modules), timm's whole trunk, or this
backbone's ``model.state_dict()``; converted by timm's ``checkpoint_filter_fn``, loaded into
the whole trunk and then trimmed, every key checked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from em_foundation.backbones.base import Backbone, BackboneOutput, FamilyBackbone
from em_foundation.backbones.checkpoint import load_converted, load_state_dict_file
from em_foundation.backbones.hub import HubSource
from em_foundation.backbones.timm_vit import (
    check_patch_size,
    create_timm_model,
    resolve_layers,
    resolve_timm_weights,
    timm_hub_source,
    timm_normalisation,
)
from em_foundation.families import family_of

GRID_STRIDE = 16

BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "sam2_t": {"family": "sam2", "model": "sam2_hiera_tiny.fb_r896"},
    "sam2_s": {"family": "sam2", "model": "sam2_hiera_small.fb_r896"},
    "sam2_bplus": {"family": "sam2", "model": "sam2_hiera_base_plus.fb_r896"},
    "sam2_l": {"family": "sam2", "model": "sam2_hiera_large.fb_r1024"},
}


def _model_name(spec: dict[str, Any]) -> str:
    return spec.get("model") or family_of(spec["family"]).default_model


def hub_source(spec: dict[str, Any]) -> HubSource:
    """The hub repository timm loads the SAM2 trunk's weights from."""
    trunks = ", ".join(p["model"] for p in BACKBONE_PRESETS.values())
    return timm_hub_source(_model_name(spec), f"SAM2 trunks: {trunks} (and their _2pt1 SAM2.1 tags)")


# SAM2's own checkpoints (facebookresearch/sam2: ``{"model": {...}}``) hold the trunk under
# this prefix beside the FPN neck, the memory modules and the mask decoder.
SAM2_TRUNK_PREFIX = "image_encoder.trunk."


def trunk_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk of a SAM2 checkpoint (SAM2's neck, memory and decoder are not the trunk); others as they are."""
    if any(key.startswith(SAM2_TRUNK_PREFIX) for key in state):
        return {k.removeprefix(SAM2_TRUNK_PREFIX): v for k, v in state.items() if k.startswith(SAM2_TRUNK_PREFIX)}
    return state


def hieradet_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's SAM2 conversion (``mlp.layers.0/1`` to ``mlp.fc1/2``; ``pos_embed`` kept)."""
    from timm.models.hieradet_sam2 import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


def block_index(key: str) -> int:
    """N of ``blocks.N.*`` (-1 for other keys)."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1


class Sam2Hiera(FamilyBackbone):
    """SAM2's Hiera trunk: tokens of chosen blocks of the stride-16 stage as a (C, H/16, W/16) grid."""

    def __init__(self, spec: dict[str, Any]) -> None:
        name = _model_name(spec)
        super().__init__(spec, timm_normalisation(name))
        if (spec.get("pooling") or "mean") != "mean":
            raise ValueError("SAM2's Hiera has no class token: set pooling: mean (the grid's average)")
        resolved = resolve_timm_weights(spec, name, hub_source)
        self.identity = resolved.identity
        model = create_timm_model(name, resolved, **dict(spec.get("model_kwargs") or {}))
        stages = [info["reduction"] for info in model.feature_info]
        if GRID_STRIDE not in stages:
            raise ValueError(f"{name} has no stride-{GRID_STRIDE} stage (stage strides {stages})")
        stage = stages.index(GRID_STRIDE)
        first = model.stage_ends[stage - 1] + 1 if stage else 0
        last = model.stage_ends[stage]
        if resolved.file is not None:
            # Into the whole trunk, before trimming: its later blocks and head are known keys.
            load_converted(
                model,
                trunk_state_dict(load_state_dict_file(resolved.file)),
                resolved.file,
                filter_fn=hieradet_filter,
                trimmed=lambda key: key.startswith("head.") or block_index(key) > last,
            )
        # Drop the stride-32 stage and the classifier head (its norm has parameters): unused.
        model.blocks = model.blocks[: last + 1]
        model.head = nn.Identity()
        self.model = model
        self.patch_size = GRID_STRIDE
        check_patch_size(spec, self.patch_size)
        self.layers = list(spec.get("layers") or [-1])
        self.block_indices = [first + i for i in resolve_layers(self.layers, last - first + 1)]
        self.embed_dim = int(model.blocks[last].dim_out) * len(self.block_indices)
        stem_stride = int(model.patch_embed.proj.stride[0])
        self.pad_to = math.lcm(GRID_STRIDE, stem_stride * int(model.window_spec[0]))
        self.pooling = "mean"

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x = self.normalise(images)
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.pad_to, 0, -height % self.pad_to))
        grids = self.model.forward_intermediates(
            x, indices=self.block_indices, coarse=False, stop_early=True, intermediates_only=True
        )
        grid = torch.cat(grids, dim=1)[..., : height // GRID_STRIDE, : width // GRID_STRIDE]
        return BackboneOutput(grid=grid, pooled=grid.mean(dim=(2, 3)))


def build(spec: dict[str, Any]) -> Backbone:
    """Builder of the sam2 family (em_foundation.families)."""
    return Sam2Hiera(spec)
