"""The same decision rules for every regime: a threshold and a post-processing size chosen
on the run's validation slices only, recorded in run.json, scored beside the published 0.5."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.evaluation.decision import best_min_size, best_threshold, choose_decision, postprocess
from em_foundation.evaluation.evaluate import evaluate_model, pooled_scores
from em_foundation.io import read_json, write_json
from em_foundation.tables import collect_runs, summarise
from em_foundation.training.run import load_segmenter, train_run
from tests.helpers import HEAD, TRAINING, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("decision")
    return {"fibsem": make_dataset(root, "fibsem", "fibsem", seed=1), "root": root}


def _invert_labels(path: str, split: str, rows: np.ndarray | None = None) -> None:
    """Swap foreground and background of a split's labels (all rows, or the given ones)."""
    with h5py.File(path, "r+") as handle:
        labels = handle[split]["labels"][()]
        chosen = np.arange(len(labels)) if rows is None else rows
        part = labels[chosen]
        labelled = part != IGNORE_LABEL
        part[labelled] = 1 - part[labelled]
        labels[chosen] = part
        handle[split]["labels"][...] = labels


def _copy(data, root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    paths = {key: str(root / Path(value).name) for key, value in data["fibsem"].items()}
    for key, value in data["fibsem"].items():
        shutil.copy(value, paths[key])
    return paths


def _train(paths: dict, split: str, out: Path, regime: str = "head") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return train_run(
        regime=regime,
        backbone_name="filterbank",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=0,
        backbone={},
        head=HEAD,
        lora={},
        training=TRAINING,
        forest={"n_estimators": 10, "max_depth": None, "min_samples_leaf": 1, "tokens_per_tile": 32},
        tiles={"fibsem": paths["tiles"]},
        features={"fibsem": paths["features"]},
        splits={"fibsem": split},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "train_log.csv",
        out_run=out / "run.json",
    )


def test_decision_is_chosen_on_validation_slices_never_on_test_slices(data, tmp_path):
    split = str(data["root"] / "fibsem.split0.json")
    clean = _train(data["fibsem"], split, tmp_path / "clean")
    assert read_json(tmp_path / "clean/run.json")["decision"] == clean["decision"]
    assert clean["decision"]["chosen_on"] == "validation"
    assert 0 < clean["decision"]["threshold"] < 1
    # every test label inverted, in the tiles and the prepared file: the decision must not move
    poisoned = _copy(data, tmp_path / "poisoned_test")
    _invert_labels(poisoned["tiles"], "test")
    _invert_labels(poisoned["prepared"], "test")
    assert _train(poisoned, split, tmp_path / "test_run")["decision"] == clean["decision"]
    # the validation labels inverted: it must (the choice really reads the validation slices)
    poisoned_val = _copy(data, tmp_path / "poisoned_val")
    with h5py.File(poisoned_val["tiles"], "r") as handle:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in handle["train"]["names"][()]]
        image_index = handle["train"]["image_index"][()]
    val = {names.index(name) for name in read_json(split)["val"]}
    _invert_labels(poisoned_val["tiles"], "train", np.flatnonzero(np.isin(image_index, list(val))))
    # (training itself also sees the inverted validation loss: the point is only that the choice moves)
    moved = _train(poisoned_val, split, tmp_path / "val_run")["decision"]
    assert moved["val_fg_iou_at_threshold"] != clean["decision"]["val_fg_iou_at_threshold"]


def test_token_forest_records_a_decision_too(data, tmp_path):
    record = _train(data["fibsem"], str(data["root"] / "fibsem.split0.json"), tmp_path, regime="forest")
    assert record["decision"]["chosen_on"] == "validation"
    assert read_json(tmp_path / "run.json")["decision"]["threshold"] == record["decision"]["threshold"]


def test_tuned_and_post_processed_columns_sit_beside_the_published_ones(data, tmp_path):
    split = str(data["root"] / "fibsem.split0.json")
    record = _train(data["fibsem"], split, tmp_path / "run")
    model = load_segmenter(tmp_path / "run/model.pt", {})
    args = (model, "head", data["fibsem"]["prepared"], data["fibsem"]["tiles"], data["fibsem"]["features"])
    published, _ = evaluate_model(*args, torch.device("cpu"))
    scored, _ = evaluate_model(*args, torch.device("cpu"), decision=record["decision"])
    pooled = pooled_scores(scored)
    for column in ("fg_iou_tuned", "fg_iou_post", "obj_f1_tuned", "obj_f1_post", "obj_count_tp_post"):
        assert column in pooled
    # the published 0.5 columns are unchanged by the decision's presence
    expected = pd.Series(pooled_scores(published))
    assert pd.Series(pooled)[expected.index].equals(expected)  # (NaN where no object matched, on both)
    # a threshold of 0.5 and no size filter give the published pixel scores
    neutral, _ = evaluate_model(*args, torch.device("cpu"), decision={"threshold": 0.5, "min_size_px": 0})
    assert pooled_scores(neutral)["fg_iou_tuned"] == pooled["fg_iou"]
    metrics = []
    for test_set in ("fibsem", "other"):
        path = tmp_path / f"{test_set}.json"
        row = {
            "backbone": "filterbank",
            "regime": "head",
            "train_set": "fibsem",
            "seed": 0,
            "test_set": test_set,
            "train_datasets": ["fibsem"],
            "threshold_tuned": record["decision"]["threshold"],
            "min_size_post": record["decision"]["min_size_px"],
            **pooled,
        }
        write_json(path, row)
        metrics.append(path)
    runs = collect_runs(metrics)
    summary = summarise(runs)
    for column in ("fg_iou_tuned", "obj_f1_post", "threshold_tuned", "min_size_post"):
        assert column in runs.columns
        assert f"{column}_mean" in summary.columns
    assert runs["fg_iou"].iloc[0] == pooled["fg_iou"]


def test_best_threshold_maximises_foreground_iou_and_ignores_unlabelled_pixels():
    rng = np.random.default_rng(0)
    truth = (rng.random(20000) < 0.3).astype(np.uint8)
    # foreground scores around 0.35, background around 0.15: 0.5 misses almost all the foreground
    probability = np.where(truth == 1, 0.35, 0.15) + rng.normal(0, 0.03, truth.size)
    threshold, iou = best_threshold(probability, truth)
    assert 0.2 < threshold < 0.3 and iou > 0.9
    ignored = truth.copy()
    ignored[:5000] = IGNORE_LABEL
    probability_noisy = probability.copy()
    probability_noisy[:5000] = rng.random(5000)  # anything under the ignore label changes nothing
    assert best_threshold(probability_noisy, ignored) == best_threshold(probability[5000:], truth[5000:])


def test_post_processing_fills_holes_and_removes_specks_with_a_size_chosen_on_the_masks_given():
    truth = np.zeros((64, 64), np.uint8)
    truth[10:30, 10:30] = 1
    truth[40:60, 35:60] = 1
    mask = truth.copy()
    mask[15:20, 15:20] = 0  # a hole
    for y, x in ((2, 2), (2, 40), (35, 5), (62, 62), (5, 60)):
        mask[y, x] = 1  # specks
    cleaned = postprocess(mask, 16)
    assert cleaned[15:20, 15:20].all() and cleaned.sum() == truth.sum()
    size, f1 = best_min_size([mask], [truth])
    assert f1[0] < 1.0 and f1[size] == 1.0 and size > 0
    decision = choose_decision([mask.astype(float) * 0.9], [truth])
    assert decision["val_obj_f1_post"] == 1.0 > decision["val_obj_f1_raw"]
    nothing = choose_decision([np.full((8, 8), 0.9)], [np.zeros((8, 8), np.uint8)])
    assert nothing["threshold"] == 0.5 and nothing["min_size_px"] == 0


def test_summary_keeps_published_columns_first():
    runs = pd.DataFrame(
        [
            {
                "backbone": "b",
                "regime": "head",
                "train_set": "t",
                "alignment": "none",
                "n_train_slices": "all",
                "seed": s,
                "test_set": "t",
                "fg_iou": 0.5 + s / 10,
                "fg_dice": 0.6,
                "mean_iou": 0.7,
                "fg_iou_tuned": 0.55 + s / 10,
                "in_domain": True,
                "transductive": False,
                "n_images": 2,
            }
            for s in (0, 1)
        ]
    )
    summary = summarise(runs)
    assert summary["fg_iou_mean"].iloc[0] == pytest.approx(0.55)
    assert summary["fg_iou_tuned_mean"].iloc[0] == pytest.approx(0.60)
