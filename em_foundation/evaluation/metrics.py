"""Segmentation metrics pooled over pixels, as the study reports them.

Foreground IoU is ΣTP / Σ(TP + FP + FN) over all pixels of all test images (not a mean
of per-image IoUs); pixels labelled IGNORE_LABEL are left out of every count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from em_foundation.data.prepared import IGNORE_LABEL


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def n_pixels(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def confusion(prediction: np.ndarray, truth: np.ndarray) -> Counts:
    """Binary confusion counts; ``truth`` may hold IGNORE_LABEL where nothing is known."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    valid = truth != IGNORE_LABEL
    pred = prediction.astype(bool)[valid]
    true = truth[valid] == 1
    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred & ~true))
    fn = int(np.count_nonzero(~pred & true))
    return Counts(tp, fp, fn, int(pred.size) - tp - fp - fn)


def _ratio(numerator: int, denominator: int) -> float:
    # An empty class in both prediction and truth is a perfect score, not 0/0.
    return 1.0 if denominator == 0 else numerator / denominator


def scores(counts: Counts) -> dict[str, float]:
    fg_iou = _ratio(counts.tp, counts.tp + counts.fp + counts.fn)
    bg_iou = _ratio(counts.tn, counts.tn + counts.fp + counts.fn)
    return {
        "fg_iou": fg_iou,
        "fg_dice": _ratio(2 * counts.tp, 2 * counts.tp + counts.fp + counts.fn),
        "bg_iou": bg_iou,
        "mean_iou": (fg_iou + bg_iou) / 2,
        "n_pixels": counts.n_pixels,
        **asdict(counts),
    }
