"""The published deconvolution head (Fuster-Barceló & Uhlmann 2026)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


class DeconvHead(nn.Module):
    """1×1 stem to ``width`` channels, four ×2 up-blocks (width → /2 → /4 → /8 → /8), 1×1 to logits.

    The published head uses width 512 (512→256→128→64→64, ×16 upsampling); the width is
    a parameter so that the CPU demo can use a narrow head with the same structure.
    Logits are resized bilinearly to the requested output size (the tile's pixels).
    """

    def __init__(self, in_channels: int, width: int = 512, num_classes: int = 2) -> None:
        super().__init__()
        channels = [width, width // 2, width // 4, width // 8, width // 8]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=1), nn.BatchNorm2d(width), nn.GELU())
        self.up = nn.Sequential(*[_up_block(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.classifier = nn.Conv2d(channels[-1], num_classes, kernel_size=1)

    def forward(self, grid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.up(self.stem(grid)))
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits
