"""Backbones: a config entry's ``family`` names a row of ``em_foundation.families.FAMILIES``.

The row names the builder module in this package; it is imported on first use because timm
and open_clip are heavy and most callers need only one family.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from em_foundation.backbones.base import Backbone, BackboneOutput
from em_foundation.families import FAMILIES, family_of


def load(path: str) -> Callable[..., Any]:
    """A table entry's "module:function" (module within this package) as the callable."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


def build_backbone(spec: dict[str, Any]) -> Backbone:
    """Build the backbone a (validated) config entry describes, in eval mode and frozen."""
    backbone = load(family_of(spec["family"]).builder)(spec)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


__all__ = ["FAMILIES", "Backbone", "BackboneOutput", "build_backbone", "load"]
