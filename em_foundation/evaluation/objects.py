"""Object-level scores: are the mitochondria found as objects, or merged and split?

A good pixel IoU can hide two touching mitochondria predicted as one, or one predicted as
three fragments. Here both masks are cut into connected components (scikit-image, full
connectivity: 8-neighbours in 2-D, 26 in 3-D), components smaller than ``min_size`` pixels
are dropped from both sides (in 3-D: whose largest section is smaller, see label_objects), and a true and a predicted object whose IoU is
strictly above 0.5 form a true positive, as panoptic quality defines it (Kirillov et al.,
2019). Above 0.5 a pair is unique by construction (two objects cannot both overlap a third
by more than half of their union), so such pairs are counted directly. No assignment is run
on the whole IoU matrix: maximising the summed IoU (Hungarian) can trade one pair above 0.5
for two below it, and then a clear match is lost.

Per pair of masks (a slice, or a stack of consecutive slices in 3-D) the counts are:

- ``tp``, ``n_true``, ``n_pred`` and ``sum_iou`` (the IoU summed over true positives);
- ``splits``: a true object is split when several predicted objects lie mostly (more than
  half of each one's pixels) inside it; each extra one counts;
- ``merges``: a predicted object merges when it covers most (more than half) of several
  true objects; each extra one counts.

Counts add over slices, and scores are taken from the pooled counts (as pixel IoU is):
precision tp/n_pred, recall tp/n_true, F1 2tp/(n_pred+n_true), matched IoU sum_iou/tp,
panoptic quality sum_iou/(tp + fp/2 + fn/2), count error (n_pred - n_true)/n_true.
Pixels under the ignore label are removed from the prediction before labelling, so an
object there is neither found nor missed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.sparse import coo_matrix
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential

from em_foundation.data.prepared import IGNORE_LABEL

MATCH_IOU = 0.5
COLUMNS = (
    "obj_precision",
    "obj_recall",
    "obj_f1",
    "obj_matched_iou",
    "pq",
    "count_error",
    "n_true_objects",
    "n_pred_objects",
    "obj_splits",
    "obj_merges",
)


@dataclass
class ObjectCounts:
    tp: int = 0
    n_true: int = 0
    n_pred: int = 0
    sum_iou: float = 0.0
    splits: int = 0
    merges: int = 0

    def __add__(self, other: "ObjectCounts") -> "ObjectCounts":
        return ObjectCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def min_size_pixels(min_area_nm2: float, pixel_size_nm: tuple[float, float] | list[float]) -> int:
    """The smallest kept object in pixels: an area in nm² over the area of one pixel."""
    return int(np.ceil(min_area_nm2 / (float(pixel_size_nm[0]) * float(pixel_size_nm[1])))) if min_area_nm2 > 0 else 0


def largest_section(labels: np.ndarray) -> np.ndarray:
    """(n_labels + 1,) pixels of each 3-D object's largest section (slice), index 0 the background."""
    n = int(labels.max())
    return np.max([np.bincount(section.ravel(), minlength=n + 1) for section in labels], axis=0)


def label_objects(mask: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Connected components of a binary mask (2-D or 3-D), those under ``min_size`` pixels removed.

    ``min_size`` is an area in pixels of one section, in 2-D and 3-D alike: a 3-D object is
    kept when its largest section has at least ``min_size`` pixels. So the one physical
    threshold (evaluation.objects.min_area_nm2) means the same in both views and needs no
    section thickness; a voxel count would keep a small speck followed through many thin
    sections and drop nothing that a 2-D view keeps for the right reason.
    """
    labels = connected_components(np.asarray(mask, dtype=bool), connectivity=mask.ndim)
    if min_size > 1:
        # by size, not skimage's remove_small_objects: its size argument changed meaning in 0.26
        sizes = np.bincount(labels.ravel()) if labels.ndim == 2 else largest_section(labels)
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
        labels = relabel_sequential(labels)[0]
    return labels


def object_counts(prediction: np.ndarray, truth: np.ndarray, min_size: int = 0) -> ObjectCounts:
    """Match the objects of one prediction to those of its truth (same shape, 2-D or 3-D)."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    ignored = truth == IGNORE_LABEL
    true_labels = label_objects((truth == 1) & ~ignored, min_size)
    pred_labels = label_objects(prediction.astype(bool) & ~ignored, min_size)
    n_true, n_pred = int(true_labels.max()), int(pred_labels.max())
    if n_true == 0 or n_pred == 0:
        return ObjectCounts(0, n_true, n_pred, 0.0, 0, 0)
    # overlap[t, p] in pixels, from the pairs that really touch (sparse: objects are small)
    both = (true_labels > 0) & (pred_labels > 0)
    overlap = coo_matrix(
        (np.ones(int(both.sum()), dtype=np.int64), (true_labels[both] - 1, pred_labels[both] - 1)),
        shape=(n_true, n_pred),
    ).toarray()
    true_area = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:]
    pred_area = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]
    iou = overlap / (true_area[:, None] + pred_area[None, :] - overlap)
    matched = iou[iou > MATCH_IOU]  # unique pairs by construction: no assignment needed
    # splits: predicted objects lying mostly inside one true object; merges: true objects mostly covered by one prediction
    mostly_inside = overlap * 2 > pred_area[None, :]
    mostly_covered = overlap * 2 > true_area[:, None]
    splits = int(np.clip(mostly_inside.sum(axis=1) - 1, 0, None).sum())
    merges = int(np.clip(mostly_covered.sum(axis=0) - 1, 0, None).sum())
    return ObjectCounts(int(matched.size), n_true, n_pred, float(matched.sum()), splits, merges)


def stack_counts(
    predictions: list[np.ndarray], truths: list[np.ndarray], min_size: int = 0, three_d: bool = False
) -> ObjectCounts:
    """Pooled counts over slices: each slice on its own (2-D), or the slices as one volume (3-D)."""
    if three_d:
        return object_counts(np.stack(predictions), np.stack(truths), min_size)
    total = ObjectCounts()
    for prediction, truth in zip(predictions, truths, strict=True):
        total = total + object_counts(prediction, truth, min_size)
    return total


def _ratio(numerator: float, denominator: float) -> float:
    # nothing to find and nothing found is perfect, as for pixel scores
    return 1.0 if denominator == 0 else numerator / denominator


def object_scores(counts: ObjectCounts) -> dict[str, float]:
    fp, fn = counts.n_pred - counts.tp, counts.n_true - counts.tp
    return {
        "obj_precision": _ratio(counts.tp, counts.n_pred),
        "obj_recall": _ratio(counts.tp, counts.n_true),
        "obj_f1": _ratio(2 * counts.tp, counts.n_pred + counts.n_true),
        "obj_matched_iou": counts.sum_iou / counts.tp if counts.tp else float("nan"),
        "pq": _ratio(counts.sum_iou, counts.tp + fp / 2 + fn / 2),
        "count_error": (counts.n_pred - counts.n_true) / counts.n_true if counts.n_true else float("nan"),
        "n_true_objects": counts.n_true,
        "n_pred_objects": counts.n_pred,
        "obj_splits": counts.splits,
        "obj_merges": counts.merges,
    }


# The raw counts, as columns of the per-image table and keys of the evaluation record, so that
# slices and the test sets of a union pool them before the scores are taken.
COUNT_COLUMNS = {f"obj_count_{f.name}": f.name for f in fields(ObjectCounts)}
THREE_D = "_3d"  # suffix of the 3-D variant of every object column (objects followed across slices)


def counts_from(record: dict, suffix: str = "") -> ObjectCounts | None:
    """The counts stored under COUNT_COLUMNS (+ suffix) in a record; None where absent or NaN."""
    values = [record.get(column + suffix) for column in COUNT_COLUMNS]
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values):
        return None
    return ObjectCounts(*(type(getattr(ObjectCounts(), f.name))(v) for f, v in zip(fields(ObjectCounts), values)))


def counts_columns(counts: ObjectCounts, suffix: str = "") -> dict[str, float]:
    return {column + suffix: getattr(counts, name) for column, name in COUNT_COLUMNS.items()}


def scores_columns(counts: ObjectCounts | None, suffix: str = "") -> dict[str, float]:
    """Scores and raw counts of one pooled set of counts; NaN everywhere where there are none (no stack)."""
    if counts is None:
        return {name + suffix: float("nan") for name in (*COLUMNS, *COUNT_COLUMNS)}
    return {
        **{name + suffix: value for name, value in object_scores(counts).items()},
        **counts_columns(counts, suffix),
    }


def min_object_size(block: dict, pixel_size_nm: list[float] | None, dataset: str) -> int:
    """The smallest kept object in pixels for one test set, from the ``evaluation.objects`` block.

    ``min_size_px`` wins when set; otherwise ``min_area_nm2`` over the pixel area, the pixel
    size taken from ``evaluation.objects.pixel_size_nm`` or else the dataset's own (2 values, nm).
    """
    if block.get("min_size_px") is not None:
        return int(block["min_size_px"])
    area = float(block.get("min_area_nm2") or 0)
    if area <= 0:
        return 0
    size = block.get("pixel_size_nm") or pixel_size_nm
    if not size:
        raise ValueError(
            f"evaluation.objects.min_area_nm2 is {area} but dataset {dataset!r} has no pixel size: set "
            "evaluation.objects.pixel_size_nm (nm per pixel, [y, x]) or evaluation.objects.min_size_px"
        )
    size = [float(size)] * 2 if np.isscalar(size) else list(size)[-2:]
    return min_size_pixels(area, size)
