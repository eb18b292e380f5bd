"""DINOv2 and DINOv3 vision transformers through timm.

timm's ``forward_intermediates`` already returns per-block patch-token grids with class
and register tokens split off, so this module only chooses blocks, weights and
normalisation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from em_foundation.backbones import BACKBONES
from em_foundation.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneOutput

# Both DINO families were trained with ImageNet's constants, so "family" and
# "imagenet" normalisation coincide for them.
FAMILY_NORMALISATION = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "dinov3": (IMAGENET_MEAN, IMAGENET_STD)}
FAMILY_DEFAULT_MODEL = {
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
    "dinov3": "vit_large_patch16_dinov3.lvd1689m",
}


class WeightsError(RuntimeError):
    """Weights could not be loaded; the message names the file and the fix."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; set backbones.<name>.weights to an existing "
            "checkpoint, or to 'pretrained' to fetch the hub weights"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint and name the first mismatched keys if it does not fit the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys (first 5): {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys (first 5): {unexpected[:5]}")
        if wrong_shape:
            parts.append(f"shape mismatches (first 5): {wrong_shape[:5]}")
        raise WeightsError(
            f"weights file {path} does not fit the architecture {type(model).__name__}: "
            + "; ".join(parts)
            + ". Check that backbones.<name>.model names the architecture the file was saved from."
        )
    model.load_state_dict(state, strict=True)


class TimmViT(Backbone):
    """A timm ViT returning the patch tokens of chosen blocks as a (C, H/p, W/p) grid."""

    lora_targets = r".*blocks\.\d+\.attn\.(qkv|proj)"

    def __init__(self, spec: dict[str, Any]) -> None:
        import timm

        family = spec["family"]
        mean, std = FAMILY_NORMALISATION[family]
        if spec.get("normalisation") == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        super().__init__(mean, std)
        self.family = family
        name = spec.get("model") or FAMILY_DEFAULT_MODEL[family]
        weights = spec.get("weights", "pretrained")
        kwargs = dict(spec.get("model_kwargs", {}))
        if weights == "random":
            init_seed = int(spec.get("options", {}).get("init_seed", 0))
            torch.manual_seed(init_seed)
            self.identity = f"random-init:{name}:seed={init_seed}:{sorted(kwargs.items())}"
        elif weights == "pretrained":
            self.identity = f"timm:{name}@{spec.get('revision') or 'default'}"
        else:
            self.identity = f"file:{Path(weights).name}:sha256={file_sha256(Path(weights))}" if Path(weights).is_file() else ""
        self.model = timm.create_model(
            name,
            pretrained=weights == "pretrained",
            num_classes=0,
            dynamic_img_size=True,
            **kwargs,
        )
        if weights not in ("random", "pretrained"):
            load_weights_strict(self.model, load_state_dict_file(Path(weights)), Path(weights))
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.layers = list(spec.get("layers", [-1]))
        self.embed_dim = int(self.model.embed_dim) * len(self.layers)
        self.pooling = spec.get("pooling", "mean")

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x = self.normalise(images)
        grids, prefixes = zip(
            *self.model.forward_intermediates(
                x, indices=self.layers, return_prefix_tokens=True, norm=True, intermediates_only=True
            )
        )
        grid = torch.cat(grids, dim=1)
        if self.pooling == "cls":
            pooled = torch.cat([prefix[:, 0] for prefix in prefixes], dim=1)
        else:
            pooled = grid.mean(dim=(2, 3))
        return BackboneOutput(grid=grid, pooled=pooled)


@BACKBONES.register("dinov2")
def build_dinov2(spec: dict[str, Any], seed: int = 0) -> Backbone:
    return TimmViT(spec)


@BACKBONES.register("dinov3")
def build_dinov3(spec: dict[str, Any], seed: int = 0) -> Backbone:
    return TimmViT(spec)
