"""Decision rules chosen on a run's validation slices, the same way for every regime.

A probability map becomes a mask by a threshold, and a mask becomes objects after the
clean-up every ilastik or U-Net user applies (holes filled, specks removed). Cutting every
model at 0.5 with no clean-up favours whichever model happens to be calibrated at 0.5;
choosing both on the test slices would leak them. So each run chooses its own threshold
(the one maximising pooled foreground IoU) and its own smallest kept object (the size
maximising object F1 after the threshold and hole filling) on its *validation* slices only,
as nnU-Net decides its post-processing on cross-validation; training records the choice in
run.json (training/run.py) and evaluation applies it beside the published 0.5 columns.

Object matching is evaluation/objects.object_counts; this module only builds masks.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from scipy.ndimage import binary_fill_holes

from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.evaluation.objects import ObjectCounts, label_objects, object_counts, object_scores

THRESHOLD_STEPS = 99  # thresholds k/100, k = 1..99
# Smallest kept objects tried, in native pixels (0: keep all); Lucchi++ mitochondria are thousands.
MIN_SIZE_CANDIDATES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048)
_EPS = 1e-12


def best_threshold(probability: np.ndarray, truth: np.ndarray, steps: int = THRESHOLD_STEPS) -> tuple[float, float]:
    """The threshold (a multiple of 1/(steps+1)) maximising foreground IoU of ``probability >= t``, and that IoU.

    ``truth`` holds 0, 1 or IGNORE_LABEL (left out). Ties go to the lowest threshold.
    """
    probability, truth = np.ravel(probability), np.ravel(truth)
    thresholds = np.arange(1, steps + 1) / (steps + 1)
    edges = np.concatenate([[0.0], thresholds, [1.0 + _EPS]])
    foreground = np.histogram(probability[truth == 1], edges)[0][::-1].cumsum()[::-1][1:]  # counts of p >= t
    background = np.histogram(probability[truth == 0], edges)[0][::-1].cumsum()[::-1][1:]
    iou = foreground / np.maximum(foreground + background + (truth == 1).sum() - foreground, 1)
    best = int(np.argmax(iou))
    return float(thresholds[best]), float(iou[best])


def postprocess(mask: np.ndarray, min_size: int) -> np.ndarray:
    """A binary mask with every enclosed hole filled and objects under ``min_size`` pixels removed."""
    filled = binary_fill_holes(np.asarray(mask, dtype=bool))
    return (label_objects(filled, min_size) > 0).astype(np.uint8)


def _pixel_iou(masks: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> float:
    tp = fp = fn = 0
    for mask, truth in zip(masks, truths, strict=True):
        valid = truth != IGNORE_LABEL
        predicted, true = mask.astype(bool) & valid, (truth == 1) & valid
        tp += int(np.count_nonzero(predicted & true))
        fp += int(np.count_nonzero(predicted & ~true))
        fn += int(np.count_nonzero(~predicted & true))
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def best_min_size(
    masks: list[np.ndarray], truths: list[np.ndarray], candidates: Iterable[int] = MIN_SIZE_CANDIDATES
) -> tuple[int, dict[int, float]]:
    """The smallest-kept-object size (of ``candidates``) maximising pooled object F1 after
    hole filling, and the F1 of each candidate. Ties go to the smaller size."""
    f1 = {}
    for size in candidates:
        counts = ObjectCounts()
        for mask, truth in zip(masks, truths, strict=True):
            counts = counts + object_counts(postprocess(mask, int(size)), truth)
        f1[int(size)] = float(object_scores(counts)["obj_f1"])
    best = max(f1, key=lambda size: (f1[size], -size))
    return best, f1


def choose_decision(probabilities: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, Any]:
    """A run's decision rules from its validation slices' probability maps and masks (native grid).

    Where the validation slices hold no foreground there is nothing to choose on: the
    published 0.5 and no size filter are kept, and ``chosen_on`` says so.
    """
    if not probabilities:
        raise ValueError("no validation slices to choose the decision threshold on")
    n_foreground = sum(int(np.count_nonzero(t == 1)) for t in truths)
    record: dict[str, Any] = {"n_val_slices": len(probabilities), "val_foreground_pixels": n_foreground}
    if n_foreground == 0:
        return {**record, "threshold": 0.5, "min_size_px": 0, "chosen_on": "nothing (no validation foreground)"}
    pooled_p = np.concatenate([p.ravel() for p in probabilities])
    pooled_t = np.concatenate([t.ravel() for t in truths])
    threshold, val_iou = best_threshold(pooled_p, pooled_t)
    masks = [(p >= threshold).astype(np.uint8) for p in probabilities]
    min_size, f1 = best_min_size(masks, truths)
    raw = sum((object_counts(m, t) for m, t in zip(masks, truths)), ObjectCounts())
    return {
        **record,
        "chosen_on": "validation",
        "threshold": threshold,
        "val_fg_iou_at_0.5": _pixel_iou([(p >= 0.5) for p in probabilities], truths),
        "val_fg_iou_at_threshold": val_iou,
        "min_size_px": min_size,
        "val_obj_f1_raw": float(object_scores(raw)["obj_f1"]),
        "val_obj_f1_post": f1[min_size],
        "val_obj_f1_by_min_size": {str(k): v for k, v in f1.items()},
        "min_size_candidates": list(MIN_SIZE_CANDIDATES),
    }
