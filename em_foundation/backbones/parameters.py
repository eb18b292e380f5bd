"""Parameter counts per backbone and regime: what each cell of the grid trains.

Backbones are built with random weights (``weights`` forced to ``random``, so nothing is
downloaded or read) on PyTorch's ``meta`` device, where tensors have shapes but no
storage: a ViT-g costs no memory and the whole table takes seconds. Families whose
forward needs real tensors at construction (none so far) could fall back to the CPU.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

COLUMNS = [
    "backbone",
    "family",
    "model",
    "regime",
    "embed_dim",
    "patch_size",
    "backbone_params",
    "adapter_params",
    "head_params",
    "total_params",
    "trainable_params",
    "trainable_fraction",
]


def _count(module: torch.nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


def _lora_count(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for name, p in module.named_parameters() if "lora_" in name))


def count_parameters(
    spec: dict[str, Any], regime: str, head_width: int, lora: dict[str, Any], device: str = "meta"
) -> dict[str, Any]:
    """Total and trainable parameters of one (backbone, regime) cell, built from random weights."""
    from em_foundation.backbones import build_backbone
    from em_foundation.backbones.lora import add_lora, make_fully_trainable
    from em_foundation.families import family_of
    from em_foundation.heads.deconv import DeconvHead
    from em_foundation.regimes import regime_of

    trains = regime_of(regime).trains
    spec = {**spec, "weights": "random"}
    if family_of(spec["family"]).segmenter:
        return _segmenter_count(spec, regime, device)
    with torch.device(device):
        backbone = build_backbone(spec)
        head = DeconvHead(backbone.embed_dim, head_width) if "head" in trains else None
        if "adapters" in trains:
            add_lora(backbone, int(lora["rank"]), float(lora["alpha"]), float(lora.get("dropout", 0.0)))
        if "backbone" in trains:
            make_fully_trainable(backbone)
    adapter = _lora_count(backbone)
    backbone_total = _count(backbone) - adapter
    head_total = _count(head)
    # What the regimes table says trains (a random forest has no torch parameters) ...
    trainable = sum({"backbone": backbone_total, "adapters": adapter, "head": head_total}[part] for part in trains)
    # ... must agree with what requires_grad says (the head's parameters always train).
    measured = _count(backbone, trainable_only=True) + head_total if trains else 0
    if measured != trainable:
        raise RuntimeError(f"{spec['family']} {regime}: {measured} trainable by requires_grad, expected {trainable}")
    total = backbone_total + adapter + head_total
    return {
        "family": spec["family"],
        "model": spec.get("model") or "",
        "regime": regime,
        "embed_dim": int(backbone.embed_dim),
        "patch_size": int(backbone.patch_size),
        "backbone_params": backbone_total,
        "adapter_params": adapter,
        "head_params": head_total,
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / total if total else 0.0,
    }


def _segmenter_count(spec: dict[str, Any], regime: str, device: str) -> dict[str, Any]:
    """A whole segmenter (the U-Net): its encoder counts as the backbone, the rest as the head; all of it trains."""
    from em_foundation.backbones import load
    from em_foundation.families import family_of

    with torch.device(device):
        model = load(family_of(spec["family"]).builder)(spec)
    total = _count(model)
    encoder = _count(model.model.encoder)
    trainable = _count(model, trainable_only=True)
    if trainable != total:
        raise RuntimeError(f"{spec['family']} {regime}: {trainable} of {total} parameters trainable, expected all")
    return {
        "family": spec["family"],
        "model": str((spec.get("options") or {}).get("encoder", "")),
        "regime": regime,
        "embed_dim": 0,  # no token grid
        "patch_size": int(model.patch_size),
        "backbone_params": encoder,
        "adapter_params": 0,
        "head_params": total - encoder,
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": 1.0 if total else 0.0,
    }


def parameter_table(config: dict[str, Any], device: str = "meta") -> pd.DataFrame:
    """One row per backbone x regime of the config (regimes from ``grid.regimes_for``)."""
    from em_foundation.grid import regimes_for

    rows = []
    for name, spec in config["backbones"].items():
        for regime in regimes_for(config, name):
            rows.append(
                {"backbone": name, **count_parameters(spec, regime, config["head"]["width"], config["lora"], device)}
            )
    return pd.DataFrame(rows, columns=COLUMNS)
