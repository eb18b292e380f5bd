"""The experiment grid: which runs and evaluations a config asks for.

Kept free of torch so that the Snakefile can enumerate the whole published grid in a
dry-run within seconds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

# Views of the families and regimes tables, importable from here as before.
from em_foundation.families import FAMILIES, FAMILY_DEFAULT_PATCH, FAMILY_OPTIONS, FAMILY_REGIMES, HUB_FAMILIES, family_of  # noqa: F401
from em_foundation.regimes import BACKBONE_REGIMES, CACHED_REGIMES  # noqa: F401

def patch_size_of(backbone: dict[str, Any]) -> int:
    """Patch size of a backbone config entry, read from its model name or overrides."""
    family = family_of(backbone["family"])
    if family.name == "filterbank":
        return int(backbone.get("options", {}).get("patch_size", family.default_patch))
    override = backbone.get("model_kwargs", {}).get("patch_size")
    if override:
        return int(override)
    match = re.search(r"patch(\d+)|-(\d+)(?:-|$)", backbone.get("model") or "")
    if match:
        return int(match.group(1) or match.group(2))
    return family.default_patch


INTENSITY_ALIGNMENTS = ("percentile", "histmatch")
ALIGNMENT_COMPONENTS = ("featstd", "percentile", "histmatch", "adabn", "balanced")


def parse_alignment(name: str) -> dict[str, Any]:
    """'none' or components joined by '-', e.g. 'featstd-balanced' or 'histmatch-adabn'.

    featstd: per-domain standardisation of cached patch tokens (cached regimes only);
    percentile / histmatch: per-domain intensity normalisation of the raw slices;
    adabn: the head's batch-norm statistics re-estimated on the unlabelled test images;
    balanced: every batch draws equally from each source dataset.
    """
    parts = [] if name == "none" else name.split("-")
    unknown = [part for part in parts if part not in ALIGNMENT_COMPONENTS]
    intensity = [part for part in parts if part in INTENSITY_ALIGNMENTS]
    if unknown or len(intensity) > 1 or len(set(parts)) != len(parts) or not name:
        raise ValueError(
            f"alignment {name!r} is not 'none' or a '-'-joined set of {', '.join(ALIGNMENT_COMPONENTS)} "
            "with at most one intensity normalisation"
        )
    return {
        "intensity": intensity[0] if intensity else "raw",
        "feature_std": "featstd" in parts,
        "adabn": "adabn" in parts,
        "balanced": "balanced" in parts,
    }


def view_of(config: dict[str, Any], backbone: str, intensity: str = "raw") -> str:
    """How a backbone sees a dataset: the tile geometry (and intensity normalisation) of its inputs.

    Tiling is shared by every backbone; the published resize mode depends on the patch
    size (1022 for patch 14, 1008 for patch 16), so it gets one view per patch size.
    """
    tiling = config["tiling"]
    if tiling["mode"] == "tile":
        geometry = f"tile{tiling['tile_size']}o{tiling['overlap']}"
    else:
        geometry = f"resize{tiling['longest_edge']}p{patch_size_of(config['backbones'][backbone])}"
    return geometry if intensity == "raw" else f"{geometry}-{intensity}"


def parse_view(view: str) -> dict[str, Any]:
    geometry, _, intensity = view.partition("-")
    intensity = intensity or "raw"
    if intensity not in ("raw", *INTENSITY_ALIGNMENTS):
        raise ValueError(f"unknown intensity normalisation {intensity!r} in tile view {view!r}")
    tile = re.fullmatch(r"tile(\d+)o(\d+)", geometry)
    if tile:
        return {"mode": "tile", "tile_size": int(tile.group(1)), "overlap": int(tile.group(2)), "intensity": intensity}
    resize = re.fullmatch(r"resize(\d+)p(\d+)", geometry)
    if resize:
        return {"mode": "resize", "longest_edge": int(resize.group(1)), "patch_size": int(resize.group(2)), "intensity": intensity}
    raise ValueError(f"unknown tile view {view!r}")


# Where everything of one trained model lives, below results/models, results/evaluation, ...
RUN_PATTERN = "{backbone}/{regime}/{train_set}/{alignment}/seed{seed}"


@dataclass(frozen=True)
class Run:
    """One trained model: a cell of the grid and one of its seeds."""

    backbone: str
    regime: str
    train_set: str
    seed: int
    alignment: str = "none"

    @property
    def path(self) -> str:
        return RUN_PATTERN.format(**asdict(self))


def regimes_for(config: dict[str, Any], backbone: str) -> list[str]:
    family = config["backbones"][backbone]["family"]
    return [r for r in config["regimes"] if r in FAMILIES[family].regimes]


def alignments_for(config: dict[str, Any], regime: str, train_set: str) -> list[str]:
    """Alignment variants of one cell: 'none' always; the others where configured and meaningful."""
    block = config["alignment"]
    chosen = ["none"]
    for name in block["variants"]:
        if name == "none" or (block["train_sets"] is not None and train_set not in block["train_sets"]):
            continue
        options = parse_alignment(name)
        if options["feature_std"] and regime not in CACHED_REGIMES:
            continue  # the tokens of a backbone that trains change every step
        if options["adabn"] and regime == "forest":
            continue  # a forest has no batch-norm statistics
        if options["balanced"] and len(config["training_sets"][train_set]) < 2:
            continue  # one source: balanced sampling would repeat another variant exactly
        chosen.append(name)
    return chosen


def runs(config: dict[str, Any]) -> list[Run]:
    return [
        Run(backbone, regime, train_set, seed, alignment)
        for backbone in config["backbones"]
        for regime in regimes_for(config, backbone)
        for train_set in config["training_sets"]
        for alignment in alignments_for(config, regime, train_set)
        for seed in config["seeds"]
    ]


def test_sets(config: dict[str, Any]) -> list[str]:
    return list(config["evaluation"]["test_sets"] or config["datasets"])
