"""Pooled metrics agree with scikit-learn and ignore unlabelled pixels."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.evaluation.metrics import Counts, confusion, scores


@pytest.mark.parametrize("seed", range(5))
def test_pooled_scores_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    truths = [(rng.random((40, 50)) < rng.uniform(0.05, 0.5)).astype(np.uint8) for _ in range(3)]
    predictions = [(rng.random((40, 50)) < rng.uniform(0.05, 0.5)).astype(np.uint8) for _ in range(3)]
    total = sum((confusion(p, t) for p, t in zip(predictions, truths)), Counts())
    result = scores(total)
    flat_truth = np.concatenate([t.ravel() for t in truths])
    flat_pred = np.concatenate([p.ravel() for p in predictions])
    assert result["fg_iou"] == pytest.approx(jaccard_score(flat_truth, flat_pred))
    assert result["fg_dice"] == pytest.approx(f1_score(flat_truth, flat_pred))
    assert result["mean_iou"] == pytest.approx(jaccard_score(flat_truth, flat_pred, average="macro"))
    assert result["n_pixels"] == flat_truth.size


def test_ignored_pixels_are_left_out():
    truth = np.array([[1, 0, IGNORE_LABEL, IGNORE_LABEL]], dtype=np.uint8)
    prediction = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    result = scores(confusion(prediction, truth))
    assert result["fg_iou"] == 1.0 and result["n_pixels"] == 2


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion(np.zeros((4, 4)), np.zeros((4, 5)))
