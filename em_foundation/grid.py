"""The experiment grid: which runs and evaluations a config asks for.

Kept free of torch so that the Snakefile can enumerate the whole published grid in a
dry-run within seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Regimes that run on cached features never run the backbone during training.
CACHED_REGIMES = ("head", "forest")
# Regimes that train (part of) the backbone, so they need the tiles and the weights.
BACKBONE_REGIMES = ("lora", "fullft")

FAMILY_REGIMES: dict[str, tuple[str, ...]] = {
    # Hand-crafted filters have nothing to adapt: only the learners on top train.
    "filterbank": ("head", "forest"),
    "dinov2": ("head", "lora", "fullft", "forest"),
    "dinov3": ("head", "lora", "fullft", "forest"),
    "openclip": ("head", "lora", "fullft", "forest"),
}

FAMILY_DEFAULT_PATCH = {"filterbank": 8, "dinov2": 14, "dinov3": 16, "openclip": 14}


def patch_size_of(backbone: dict[str, Any]) -> int:
    """Patch size of a backbone config entry, read from its model name or overrides."""
    family = backbone["family"]
    if family == "filterbank":
        return int(backbone.get("options", {}).get("patch_size", FAMILY_DEFAULT_PATCH[family]))
    override = backbone.get("model_kwargs", {}).get("patch_size")
    if override:
        return int(override)
    match = re.search(r"patch(\d+)|-(\d+)(?:-|$)", backbone.get("model") or "")
    if match:
        return int(match.group(1) or match.group(2))
    return FAMILY_DEFAULT_PATCH[family]


def view_of(config: dict[str, Any], backbone: str) -> str:
    """How a backbone sees a dataset: the tile geometry its tiles and features are cut with.

    Tiling is shared by every backbone; the published resize mode depends on the patch
    size (1022 for patch 14, 1008 for patch 16), so it gets one view per patch size.
    """
    tiling = config["tiling"]
    if tiling["mode"] == "tile":
        return f"tile{tiling['tile_size']}o{tiling['overlap']}"
    return f"resize{tiling['longest_edge']}p{patch_size_of(config['backbones'][backbone])}"


def parse_view(view: str) -> dict[str, Any]:
    tile = re.fullmatch(r"tile(\d+)o(\d+)", view)
    if tile:
        return {"mode": "tile", "tile_size": int(tile.group(1)), "overlap": int(tile.group(2))}
    resize = re.fullmatch(r"resize(\d+)p(\d+)", view)
    if resize:
        return {"mode": "resize", "longest_edge": int(resize.group(1)), "patch_size": int(resize.group(2))}
    raise ValueError(f"unknown tile view {view!r}")


@dataclass(frozen=True)
class Run:
    """One trained model: a cell of the grid and one of its seeds."""

    backbone: str
    regime: str
    train_set: str
    seed: int

    @property
    def path(self) -> str:
        return f"{self.backbone}/{self.regime}/{self.train_set}/seed{self.seed}"


def regimes_for(config: dict[str, Any], backbone: str) -> list[str]:
    family = config["backbones"][backbone]["family"]
    return [r for r in config["regimes"] if r in FAMILY_REGIMES[family]]


def runs(config: dict[str, Any]) -> list[Run]:
    return [
        Run(backbone, regime, train_set, seed)
        for backbone in config["backbones"]
        for regime in regimes_for(config, backbone)
        for train_set in config["training_sets"]
        for seed in config["seeds"]
    ]


def test_sets(config: dict[str, Any]) -> list[str]:
    return list(config["evaluation"]["test_sets"] or config["datasets"])
