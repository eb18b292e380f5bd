"""The reference points that make "foundational" measurable, declared once.

A VFM's score means little alone: a lab would otherwise train an ilastik-style pixel
classifier (a filter bank and a random forest per pixel) or a U-Net on its own labels.
The runs of these (family, regime) pairs are ordinary runs of the grid (runs.csv and
summary.csv carry them like any other); the IoU figure also draws each one's in-domain
score as a reference line per test set, so that a reader sees at a glance where every VFM
regime falls between the hand-crafted baseline and the supervised model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reference:
    family: str
    regime: str | None  # None: every regime the family runs
    label: str
    style: str  # matplotlib line style of its reference line


REFERENCES: tuple[Reference, ...] = (
    Reference("filterbank", "pixelforest", "pixel forest on filters (ilastik-grade)", "--"),
    Reference("unet", None, "U-Net trained on the labels", ":"),
)


def reference_runs(config: dict[str, Any]) -> list[dict[str, str]]:
    """(backbone, regime, label, style) of every configured run that is a reference point."""
    from em_foundation.grid import regimes_for

    chosen = []
    for backbone, spec in config["backbones"].items():
        for reference in REFERENCES:
            if spec["family"] != reference.family:
                continue
            for regime in regimes_for(config, backbone):
                if reference.regime in (None, regime):
                    label = f"{reference.label}: {backbone}"
                    chosen.append({"backbone": backbone, "regime": regime, "label": label, "style": reference.style})
    return chosen


def in_domain_training_sets(config: dict[str, Any]) -> dict[str, str]:
    """Test set -> the training set of that dataset alone (where the config has one)."""
    chosen: dict[str, str] = {}
    for name, members in config["training_sets"].items():
        if len(members) == 1:
            chosen.setdefault(members[0], name)
    return chosen
