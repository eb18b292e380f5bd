"""Object-level metrics against masks whose splits, merges, misses and false positives are known by hand."""

import numpy as np
import pandas as pd
import pytest

from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.data.registry import has_stack_test_split
from em_foundation.evaluation.evaluate import pooled_scores
from em_foundation.evaluation.objects import (
    counts_columns,
    label_objects,
    min_object_size,
    min_size_pixels,
    object_counts,
    object_scores,
    stack_counts,
)


def box(mask, rows, cols, value=1):
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value


def hand_built():
    truth, prediction = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    box(truth, (2, 9), (2, 9))
    box(prediction, (2, 9), (2, 9))  # T1 found exactly
    box(truth, (2, 9), (20, 35))  # T2 (128 px) split into two halves of 56 px: IoU 0.44 each
    box(prediction, (2, 9), (20, 26))
    box(prediction, (2, 9), (29, 35))
    box(truth, (20, 25), (2, 7))
    box(truth, (20, 25), (10, 15))  # T3, T4 merged into one prediction
    box(prediction, (20, 25), (2, 15))
    box(truth, (30, 37), (30, 37))  # T5 missed
    box(prediction, (30, 35), (2, 7))  # a false positive
    box(truth, (30, 35), (15, 20))
    box(prediction, (30, 35), (15, 19))  # T6 found with IoU 30/36
    return prediction, truth


def test_hand_built_masks_give_the_exact_object_metrics():
    counts = object_counts(*hand_built())
    assert (counts.n_true, counts.n_pred, counts.tp, counts.splits, counts.merges) == (6, 6, 2, 1, 1)
    assert counts.sum_iou == pytest.approx(1 + 30 / 36)
    scores = object_scores(counts)
    assert scores["obj_precision"] == pytest.approx(2 / 6)
    assert scores["obj_recall"] == pytest.approx(2 / 6)
    assert scores["obj_f1"] == pytest.approx(1 / 3)
    assert scores["obj_matched_iou"] == pytest.approx((1 + 30 / 36) / 2)
    assert scores["pq"] == pytest.approx((1 + 30 / 36) / (2 + 4 / 2 + 4 / 2))
    assert scores["count_error"] == 0.0
    assert (scores["n_true_objects"], scores["n_pred_objects"], scores["obj_splits"], scores["obj_merges"]) == (
        6,
        6,
        1,
        1,
    )


def test_slices_pool_their_counts():
    prediction, truth = hand_built()
    empty = np.zeros_like(truth)
    pooled = stack_counts([prediction, empty], [truth, truth])
    assert (pooled.n_true, pooled.n_pred, pooled.tp) == (12, 6, 2)
    assert object_scores(pooled)["count_error"] == pytest.approx(-0.5)


def test_three_d_components_join_objects_across_slices():
    truth = np.zeros((2, 12, 12), np.uint8)
    box(truth[0], (2, 5), (2, 5))
    box(truth[1], (2, 5), (2, 5))  # one mitochondrion through two sections
    box(truth[1], (6, 9), (6, 9))  # touches the first one corner to corner in 3-D only
    prediction = truth.copy()
    assert label_objects(truth).max() == 1  # 26-connectivity: one object
    two_d = stack_counts(list(prediction), list(truth))
    three_d = stack_counts(list(prediction), list(truth), three_d=True)
    assert (two_d.n_true, two_d.tp) == (2, 2)  # slice 1 has its two squares touching diagonally: one 2-D object
    assert (three_d.n_true, three_d.n_pred, three_d.tp) == (1, 1, 1)


def test_small_objects_are_dropped_from_both_sides():
    truth, prediction = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    box(truth, (2, 9), (2, 9))
    box(prediction, (2, 9), (2, 9))
    box(prediction, (15, 16), (15, 16))  # a 4-pixel speck
    box(truth, (15, 15), (2, 3))  # a 2-pixel true speck
    assert (object_counts(prediction, truth).n_pred, object_counts(prediction, truth).n_true) == (2, 2)
    kept = object_counts(prediction, truth, min_size=min_size_pixels(100.0, (5.0, 5.0)) + 1)
    assert (kept.n_true, kept.n_pred, kept.tp) == (1, 1, 1)
    assert min_size_pixels(100.0, (5.0, 5.0)) == 4 and min_size_pixels(0, (5.0, 5.0)) == 0


def test_objects_under_the_ignore_label_are_neither_found_nor_missed():
    truth, prediction = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    box(truth, (2, 9), (2, 9))
    box(prediction, (2, 9), (2, 9))
    box(truth, (12, 18), (12, 18), IGNORE_LABEL)
    box(prediction, (13, 16), (13, 16))
    counts = object_counts(prediction, truth)
    assert (counts.n_true, counts.n_pred, counts.tp) == (1, 1, 1)


def test_nothing_to_find_and_nothing_found_is_perfect():
    empty = np.zeros((8, 8), np.uint8)
    scores = object_scores(object_counts(empty, empty))
    assert scores["obj_f1"] == 1.0 and scores["pq"] == 1.0 and np.isnan(scores["count_error"])


def test_min_object_size_from_the_config_block():
    assert min_object_size({"min_area_nm2": 100.0}, [5.0, 5.0], "lucchi") == 4
    assert min_object_size({"min_area_nm2": 100.0, "pixel_size_nm": 10.0}, [5.0, 5.0], "lucchi") == 1
    assert min_object_size({"min_area_nm2": 100.0, "min_size_px": 7}, None, "lucchi") == 7
    assert min_object_size({"min_area_nm2": 0}, None, "vnc") == 0
    with pytest.raises(ValueError, match=r"vnc.*evaluation.objects.pixel_size_nm.*min_size_px"):
        min_object_size({"min_area_nm2": 100.0}, None, "vnc")


def test_stack_test_split_is_declared_per_converter():
    assert has_stack_test_split({"converter": "lucchi_pp"})
    assert not has_stack_test_split({"converter": "vnc"})  # the published shuffle scatters its test sections
    assert has_stack_test_split({"converter": "vnc", "options": {"split": "contiguous"}})
    assert not has_stack_test_split({"converter": "synthetic", "options": {"domain": "fibsem"}})


def test_pooled_scores_pool_object_counts_over_slices_and_label_the_3d_variant():
    prediction, truth = hand_built()
    empty = np.zeros_like(truth)
    rows = [counts_columns(object_counts(p, t)) for p, t in ((prediction, truth), (empty, truth))]
    per_image = pd.DataFrame([{"tp": 1, "fp": 0, "fn": 0, "tn": 1, **row} for row in rows])
    pooled = pooled_scores(per_image, objects_3d=object_counts(np.stack([prediction]), np.stack([truth])))
    assert (pooled["n_true_objects"], pooled["n_pred_objects"]) == (12, 6)
    assert pooled["obj_recall"] == pytest.approx(2 / 12) and pooled["obj_precision"] == pytest.approx(2 / 6)
    assert pooled["obj_f1_3d"] == pytest.approx(1 / 3) and pooled["n_true_objects_3d"] == 6
    no_stack = pooled_scores(per_image)
    assert "obj_f1_3d" not in no_stack and no_stack["obj_f1"] == pooled["obj_f1"]


def test_a_clear_match_above_half_is_not_traded_for_two_below_it():
    """The issue's configuration: Hungarian on the whole IoU matrix prefers t1-p2 + t2-p1 (summed
    IoU 0.3 + 0.29 > 0.531) and keeps no pair; PQ's matching keeps t1-p1 (IoU 0.531)."""
    truth, prediction = np.zeros((130, 100), np.uint8), np.zeros((130, 100), np.uint8)
    box(truth, (0, 99), (0, 99))  # t1: 10,000 px
    box(prediction, (31, 129), (0, 99))  # p1: 9,900 px, 6,900 of them in t1 (rows 31-99)
    box(prediction, (0, 29), (0, 99))  # p2: 3,000 px inside t1, apart from p1 (row 30 empty)
    box(truth, (101, 129), (0, 99))  # t2: 2,900 px inside p1, apart from t1 (row 100 empty)
    counts = object_counts(prediction, truth)
    assert (counts.n_true, counts.n_pred) == (2, 2)
    iou_t1_p1 = 6900 / (10000 + 9900 - 6900)
    assert counts.tp == 1 and counts.sum_iou == pytest.approx(iou_t1_p1)
    assert object_scores(counts)["pq"] == pytest.approx(iou_t1_p1 / (1 + 1 / 2 + 1 / 2))
    assert object_scores(counts)["pq"] == pytest.approx(0.265, abs=5e-4)


def test_an_iou_of_exactly_one_half_is_no_match():
    truth, prediction = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    box(truth, (0, 1), (0, 3))  # 8 px
    box(prediction, (0, 1), (0, 1))  # 4 px inside it: IoU 0.5
    assert object_counts(prediction, truth).tp == 0


def reference_pq(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Panoptic quality straight from its definition, pair by pair (Kirillov et al., 2019, eq. 1)."""
    from scipy import ndimage

    structure = np.ones((3,) * truth.ndim)
    true_labels, n_true = ndimage.label(truth == 1, structure)
    pred_labels, n_pred = ndimage.label(prediction == 1, structure)
    matched_iou, matched_true, matched_pred = [], set(), set()
    for t in range(1, n_true + 1):
        for p in range(1, n_pred + 1):
            a, b = true_labels == t, pred_labels == p
            iou = (a & b).sum() / (a | b).sum()
            if iou > 0.5:
                matched_iou.append(iou)
                matched_true.add(t)
                matched_pred.add(p)
    tp = len(matched_iou)
    fp, fn = n_pred - len(matched_pred), n_true - len(matched_true)
    return 1.0 if tp + fp + fn == 0 else float(sum(matched_iou) / (tp + fp / 2 + fn / 2))


@pytest.mark.parametrize("seed", range(8))
def test_pq_of_random_masks_agrees_with_the_definition(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    # blobs: smoothed noise thresholded, the prediction a perturbed copy (many partial overlaps)
    field = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 2.5)
    truth = (field > 0.05).astype(np.uint8)
    noisy = ndimage.gaussian_filter(field + 0.12 * rng.normal(size=field.shape), 1.0)
    prediction = (noisy > rng.uniform(-0.05, 0.15)).astype(np.uint8)
    assert object_scores(object_counts(prediction, truth))["pq"] == pytest.approx(reference_pq(prediction, truth))


def test_the_3d_minimum_is_an_area_per_section_not_a_voxel_count():
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[:, 2:4, 2:4] = 1  # a 2 x 2 speck through 6 sections: 24 voxels, 4 px in every section
    truth[1:3, 6:10, 6:10] = 1  # a real object: 16 px sections
    assert label_objects(truth, min_size=10).max() == 1  # the speck goes, though 24 voxels >= 10
    assert label_objects(truth, min_size=17).max() == 0
    assert label_objects(truth[1], min_size=10).max() == 1  # the same area threshold in 2-D
