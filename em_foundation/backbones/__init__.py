"""Backbones: a config entry's ``family`` names a row of ``em_foundation.families.FAMILIES``.

The row names the builder module; it is imported on first use because timm and open_clip
are heavy and most callers need only one family.
"""

from __future__ import annotations

from typing import Any

from em_foundation.backbones.base import Backbone, BackboneOutput
from em_foundation.families import FAMILIES, family_of


def build_backbone(spec: dict[str, Any]) -> Backbone:
    """Build the backbone a (validated) config entry describes, in eval mode and frozen."""
    backbone = family_of(spec["family"]).load_builder()(spec)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


__all__ = ["FAMILIES", "Backbone", "BackboneOutput", "build_backbone"]
