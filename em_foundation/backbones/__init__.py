"""Backbone registry: a config entry's ``family`` names the builder.

Builders are registered by the family modules; they are imported lazily because timm and
open_clip are heavy and most callers need only one family.
"""

from __future__ import annotations

import importlib
from typing import Any

from em_foundation.backbones.base import Backbone, BackboneOutput
from em_foundation.registry import Registry

BACKBONES: Registry[Backbone] = Registry("backbone family")

# family -> module that registers it
_FAMILY_MODULES = {
    "filterbank": "em_foundation.backbones.filterbank",
    "dinov2": "em_foundation.backbones.timm_vit",
    "dinov3": "em_foundation.backbones.timm_vit",
    "openclip": "em_foundation.backbones.openclip",
}


def build_backbone(spec: dict[str, Any], seed: int = 0) -> Backbone:
    """Build the backbone a (validated) config entry describes, in eval mode and frozen."""
    family = spec["family"]
    if family not in BACKBONES and family in _FAMILY_MODULES:
        importlib.import_module(_FAMILY_MODULES[family])
    backbone = BACKBONES.get(family)(spec, seed)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


__all__ = ["BACKBONES", "Backbone", "BackboneOutput", "build_backbone"]
