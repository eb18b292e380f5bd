"""Segmentation heads that turn a patch-token grid into per-pixel logits."""

from em_foundation.heads.deconv import DeconvHead

__all__ = ["DeconvHead"]
