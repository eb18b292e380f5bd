"""Soft Dice loss over both classes, as published."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from em_foundation.data.prepared import IGNORE_LABEL


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax probabilities.

    Pixels labelled IGNORE_LABEL (unlabelled areas, e.g. in Kasthuri++) count for
    neither prediction nor truth. Sums run over the whole batch, so a tile with no
    mitochondria does not get a Dice of 0/0.
    """
    intersection, total = dice_sums(logits, labels)
    dice = (2 * intersection + eps) / (total + eps)
    return 1 - dice.mean()


def dice_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the sum of probability × truth, and of probability + truth, over valid pixels.

    Sums of several batches add up to those of their union, so a loss over a whole split
    can be accumulated batch by batch (training/forest.py).
    """
    num_classes = logits.shape[1]
    valid = (labels != IGNORE_LABEL).unsqueeze(1).float()
    target = F.one_hot(torch.where(labels == IGNORE_LABEL, 0, labels).long(), num_classes)
    target = target.permute(0, 3, 1, 2).float() * valid
    probs = logits.float().softmax(dim=1) * valid
    dims = (0, 2, 3)
    return (probs * target).sum(dims), probs.sum(dims) + target.sum(dims)
