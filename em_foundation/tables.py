"""Aggregate every evaluation into the tables other tools rely on.

``runs.csv``: one row per (backbone, regime, training set, seed, test set), with a 95 %
bootstrap interval over test images (``fg_iou_ci_low``/``fg_iou_ci_high``, ``n_images``) and
whether the training batches were augmented (``augment``: training.augment, none or flips_rot90).
``summary.csv`` / ``summary.md``: mean, sample standard deviation (ddof 1) and n per cell
(the spread over seeds), beside the 95 % bootstrap interval over test images of that mean.

Two sources of uncertainty, reported side by side because neither contains the other: the
seed spread says how much training noise moves a score on these test images; the image
interval says how much the score depends on which test slices happened to be drawn (VNC
has 3 of them). The image bootstrap resamples whole slices with replacement, within each
test set of a union, and recomputes the pooled IoU ΣTP / Σ(TP+FP+FN) from the resampled
slices' counts; for a cell, every seed sees the same resample, and the seed mean is taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from em_foundation.evaluation.metrics import Counts, scores
from em_foundation.evaluation.objects import COLUMNS as OBJECT_COLUMNS
from em_foundation.evaluation.objects import THREE_D, ObjectCounts, counts_from, scores_columns
from em_foundation.grid import parse_alignment
from em_foundation.io import read_json

CI_LEVEL = 95.0

# n_train_slices: labelled training slices per source ('all', or a number as text: label efficiency).
RUN_KEYS = ["backbone", "regime", "train_set", "alignment", "n_train_slices", "seed", "test_set"]
CELL_KEYS = ["backbone", "regime", "train_set", "alignment", "n_train_slices", "test_set"]


def with_n_train_slices(frame: pd.DataFrame) -> pd.DataFrame:
    """The n_train_slices column as text ('all' where a table predates the sweep), so that
    CSV round trips (which read '2' as a number) keep the keys equal."""
    frame = frame.copy()
    if "n_train_slices" not in frame.columns:
        frame["n_train_slices"] = "all"
    frame["n_train_slices"] = frame["n_train_slices"].fillna("all").astype(str)
    return frame


METRICS = ["fg_iou", "fg_dice", "mean_iou"]
# Object scores (evaluation/objects.py): 2-D per slice, and with suffix _3d over a contiguous
# test stack (NaN where the test split is not one). Averaged over seeds like the pixel scores.
OBJECT_METRICS = [*OBJECT_COLUMNS, *(c + THREE_D for c in OBJECT_COLUMNS)]


def _union_objects(scored: list[dict]) -> dict:
    """Object scores of a union from its members' summed counts (3-D only if every member has them)."""
    union = {}
    for suffix in ("", THREE_D):
        counts = [counts_from(row, suffix) for row in scored]
        if any(c is None for c in counts):
            if suffix == "":
                return {}
            union.update(scores_columns(None, suffix))
            continue
        union.update(scores_columns(sum(counts, ObjectCounts()), suffix))
    return union


def union_rows(rows: list[dict]) -> list[dict]:
    """A multi-dataset model scored on the union of its sources' test splits.

    Pixel counts are summed before the ratios are taken, so the union score is the
    pooled IoU over all those pixels, not a mean of the per-source IoUs.
    """
    by_run: dict[tuple, list[dict]] = {}
    for row in rows:
        by_run.setdefault(tuple(str(row.get(k, "all")) for k in RUN_KEYS[:-1]), []).append(row)
    unions = []
    for members in by_run.values():
        sources = list(members[0]["train_datasets"])
        scored = [row for row in members if row["test_set"] in sources]
        if len(sources) < 2 or len(scored) != len(sources):
            continue
        total = Counts(*(sum(int(row[k]) for row in scored) for k in ("tp", "fp", "fn", "tn")))
        unions.append(
            {
                **{
                    k: v
                    for k, v in scored[0].items()
                    if k in RUN_KEYS or k in ("train_datasets", "n_labelled_slices", "n_validation_slices", "augment")
                },
                "test_set": "+".join(sources),
                **scores(total),
                "n_images": sum(int(r["n_images"]) for r in scored),
                **_union_objects(scored),
            }
        )
    return unions


NO_FOLD = -1


def _fold_of(name: str, folds: dict[str, list]) -> int:
    ks = {folds[part][1] for part in str(name).split("+") if part in folds}
    return ks.pop() if len(ks) == 1 else NO_FOLD


def apply_folds(frame: pd.DataFrame, folds: dict[str, list] | None) -> pd.DataFrame:
    """Name the k-fold datasets and training sets by their dataset, with the fold in a column.

    ``folds`` maps ``vncfold2`` (and ``pairedfold2``) to ``["vnc", 2]`` (grid.fold_names).
    Scores of one fold's model on another fold's test sections are dropped: that model
    trained on them. A model that trained on no fold (``lucchi``) keeps its score on every
    fold's test sections, each in its fold. Without folds, ``fold`` is -1 everywhere.
    """
    frame = frame.copy()
    if not folds:
        frame["fold"] = NO_FOLD
        return frame
    train_fold = frame["train_set"].map(lambda name: _fold_of(name, folds))
    test_fold = frame["test_set"].map(lambda name: _fold_of(name, folds))
    leaky = (train_fold != NO_FOLD) & (test_fold != NO_FOLD) & (train_fold != test_fold)
    frame = frame[~leaky].copy()
    frame["fold"] = np.where(train_fold[~leaky] != NO_FOLD, train_fold[~leaky], test_fold[~leaky]).astype(int)

    def base(name: str) -> str:
        return "+".join(folds[part][0] if part in folds else part for part in str(name).split("+"))

    frame["train_set"] = frame["train_set"].map(base)
    frame["test_set"] = frame["test_set"].map(base)
    if "train_datasets" in frame:
        frame["train_datasets"] = frame["train_datasets"].map(lambda names: [base(n) for n in names])
    return frame


def pooled_iou_replicates(counts: np.ndarray, strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the seed-averaged pooled IoU (see pooled_iou_interval)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[-1] != 3 or counts.shape[1] != len(strata):
        raise ValueError(f"counts must be (n_runs, n_images, 3) for {len(strata)} images, got {counts.shape}")
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, counts.shape[1]))
    strata = np.asarray(strata)
    for stratum in dict.fromkeys(strata.tolist()):
        members = np.flatnonzero(strata == stratum)
        drawn = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        for row, picks in enumerate(drawn):
            weights[row] += np.bincount(picks, minlength=counts.shape[1])
    totals = np.einsum("bi,rik->brk", weights, counts)  # (n_boot, n_runs, 3)
    denominator = totals.sum(axis=-1)
    iou = np.divide(totals[..., 0], denominator, out=np.ones_like(denominator), where=denominator > 0)
    return iou.mean(axis=1)


def _percentile_interval(replicates: np.ndarray, ci: float = CI_LEVEL) -> tuple[float, float]:
    alpha = (100.0 - ci) / 2
    low, high = np.percentile(replicates, [alpha, 100.0 - alpha])
    return float(low), float(high)


def pooled_iou_interval(
    counts: np.ndarray, strata: np.ndarray, n_boot: int, seed: int, ci: float = CI_LEVEL
) -> tuple[float, float]:
    """Bootstrap interval over test images of the (seed-averaged) pooled foreground IoU.

    ``counts`` is (n_runs, n_images, 3): TP, FP, FN of each image for each run, every run
    on the same images in the same order; ``strata`` (n_images,) names each image's test
    set, and images are resampled with replacement within their stratum, so a union keeps
    its composition. Each replicate recomputes ΣTP / Σ(TP+FP+FN) per run from the resampled
    images and averages over runs. Seeded, so the same tables give the same interval.
    """
    if n_boot <= 0 or np.shape(counts)[1] == 0:
        return float("nan"), float("nan")
    return _percentile_interval(pooled_iou_replicates(counts, strata, n_boot, seed), ci)


def _image_counts(
    by_run: dict[tuple, pd.DataFrame], run: tuple, test_sets: list[str]
) -> tuple[np.ndarray, np.ndarray, list]:
    """(strata, counts (n_images, 3), image keys) of one run on the named test sets, sorted by image."""
    frames = [by_run[(*run, test_set)] for test_set in test_sets if (*run, test_set) in by_run]
    if len(frames) != len(test_sets):
        return np.array([]), np.zeros((0, 3)), []
    images = pd.concat(frames, ignore_index=True).sort_values(["test_set", "image"], key=lambda c: c.astype(str))
    keys = list(zip(images["test_set"].astype(str), images["image"].astype(str)))
    return images["test_set"].astype(str).to_numpy(), images[["tp", "fp", "fn"]].to_numpy(np.float64), keys


# A run's identity for the per-image lookups: the fold is part of it.
IMAGE_KEYS = RUN_KEYS[:-1] + ["fold", "test_set"]


def _group_images(per_image: pd.DataFrame, folds: dict[str, list] | None = None) -> dict[tuple, pd.DataFrame]:
    per_image = with_n_train_slices(per_image)
    if "alignment" not in per_image.columns:
        per_image["alignment"] = "none"
    per_image["seed"] = per_image["seed"].astype(int)
    if "fold" not in per_image.columns:
        per_image = apply_folds(per_image, folds)
    return {tuple(key): frame for key, frame in per_image.groupby(IMAGE_KEYS, sort=False)}


def add_image_intervals(
    runs: pd.DataFrame, per_image: pd.DataFrame, n_boot: int, seed: int, folds: dict[str, list] | None = None
) -> pd.DataFrame:
    """``fg_iou_ci_low`` / ``fg_iou_ci_high`` per run row from its slices' pixel counts."""
    by_run = _group_images(per_image, folds)
    lows, highs = [], []
    for row in runs.itertuples(index=False):
        run = tuple(getattr(row, key) for key in IMAGE_KEYS[:-1])
        strata, counts, _ = _image_counts(by_run, run, row.test_set.split("+"))
        low, high = pooled_iou_interval(counts[None], strata, n_boot, seed) if len(strata) else (np.nan, np.nan)
        lows.append(low)
        highs.append(high)
    return runs.assign(fg_iou_ci_low=lows, fg_iou_ci_high=highs)


def collect_runs(
    metric_files: Iterable[str | Path],
    per_image: pd.DataFrame | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    folds: dict[str, list] | None = None,
) -> pd.DataFrame:
    """One row per run and test set; with ``per_image`` (the slices' counts) an image interval per row.

    ``folds`` (grid.fold_names): k-fold datasets and training sets are named by their
    dataset with a ``fold`` column (see apply_folds); without, no ``fold`` column.
    """
    rows = [read_json(path) for path in metric_files]
    for row in rows:
        row.setdefault("alignment", "none")
        row["n_train_slices"] = str(row.get("n_train_slices", "all"))
        row.setdefault("augment", "none")  # training.augment of the run (evaluations before it: none)
    runs = pd.DataFrame(rows + union_rows(rows))
    if runs.empty:
        raise ValueError("no evaluation results to aggregate")
    runs = apply_folds(runs, folds)
    runs["in_domain"] = [
        set(test.split("+")) <= set(datasets) for test, datasets in zip(runs["test_set"], runs["train_datasets"])
    ]
    runs["train_datasets"] = runs["train_datasets"].map("+".join)
    # Statistics of the scored test images entered the prediction (alignment component 'trans').
    runs["transductive"] = runs["alignment"].map(lambda name: parse_alignment(name)["transductive"])
    if per_image is not None:
        runs = add_image_intervals(runs, per_image, n_boot, boot_seed, folds)
    else:
        runs = runs.assign(fg_iou_ci_low=np.nan, fg_iou_ci_high=np.nan)
    keys = RUN_KEYS[:-1] + ["fold", "test_set"] if folds else RUN_KEYS
    if not folds:
        runs = runs.drop(columns="fold")
    first = keys + METRICS
    first += ["fg_iou_ci_low", "fg_iou_ci_high", "n_pixels", "n_images", "in_domain", "transductive", "augment"]
    return runs[first + [c for c in runs.columns if c not in first]].sort_values(keys, ignore_index=True)


def summarise(
    runs: pd.DataFrame,
    per_image: pd.DataFrame | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    folds: dict[str, list] | None = None,
) -> pd.DataFrame:
    """Mean, sample std (ddof 1) and n over seeds per cell; with ``per_image``, the image interval of the mean.

    With k folds, a cell's runs are its seeds × folds; every fold has its own test images,
    resampled on their own, and the interval is that of the mean over all of them.
    """
    runs = with_n_train_slices(runs if "fold" in runs.columns else runs.assign(fold=NO_FOLD))
    grouped = runs.groupby(CELL_KEYS, sort=True)
    metrics = METRICS + [m for m in OBJECT_METRICS if m in runs.columns]
    summary = grouped[metrics].agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat if stat != 'count' else 'n'}" for metric, stat in summary.columns]
    summary["seeds"] = grouped["seed"].agg(lambda s: " ".join(map(str, sorted(s))))
    summary["in_domain"] = grouped["in_domain"].first()
    if "n_labelled_slices" in runs.columns:  # what 'all' means in slices (seeds agree unless the split differs)
        summary["n_labelled_slices"] = grouped["n_labelled_slices"].mean()
    if "n_validation_slices" in runs.columns:  # the label-efficiency figure counts these too
        summary["n_validation_slices"] = grouped["n_validation_slices"].mean()
    summary["transductive"] = grouped["transductive"].first()
    if "augment" in runs.columns:  # one setting per config; "+"-joined if tables of two configs were merged
        summary["augment"] = grouped["augment"].agg(lambda a: "+".join(sorted(set(map(str, a)))))
    summary["n_images"] = runs.drop_duplicates(CELL_KEYS + ["fold"]).groupby(CELL_KEYS, sort=True)["n_images"].sum()
    if folds:
        summary["folds"] = grouped["fold"].agg(lambda f: " ".join(map(str, sorted(set(f)))))
    summary = summary.reset_index()
    lows, highs = [], []
    by_run = _group_images(per_image, folds) if per_image is not None else {}
    for cell in summary.itertuples(index=False):
        key = {k: getattr(cell, k) for k in CELL_KEYS}
        members = runs[(runs[CELL_KEYS] == pd.Series(key)).all(axis=1)]
        replicates = []
        for fold, fold_runs in members.groupby("fold"):
            stacked, strata, images = [], None, None
            for seed in sorted(fold_runs["seed"]):
                run = (
                    key["backbone"],
                    key["regime"],
                    key["train_set"],
                    key["alignment"],
                    key["n_train_slices"],
                    int(seed),
                    int(fold),
                )
                strata_, counts, keys = _image_counts(by_run, run, str(key["test_set"]).split("+"))
                if images is not None and keys != images:
                    raise ValueError(f"seeds of cell {key} were scored on different test images; cannot pair them")
                strata, images = strata_, keys
                stacked.append(counts)
            if by_run and images and n_boot > 0:
                # each fold's seed mean, weighted by its seeds in the mean over seeds × folds
                replicates.append(
                    (pooled_iou_replicates(np.stack(stacked), strata, n_boot, boot_seed + int(fold) + 1), len(stacked))
                )
        if len(replicates) == members["fold"].nunique() and replicates:
            weights = np.array([n for _, n in replicates], dtype=float)
            low, high = _percentile_interval(np.average(np.stack([r for r, _ in replicates]), axis=0, weights=weights))
        else:
            low, high = np.nan, np.nan
        lows.append(low)
        highs.append(high)
    summary["fg_iou_ci_low"], summary["fg_iou_ci_high"] = lows, highs
    first = CELL_KEYS + ["fg_iou_mean", "fg_iou_std", "fg_iou_n", "fg_iou_ci_low", "fg_iou_ci_high", "n_images"]
    return summary[first + [c for c in summary.columns if c not in first]]


def _interval_text(low: float, high: float) -> str:
    return "" if pd.isna(low) or pd.isna(high) else f" [{low:.3f}, {high:.3f}]"


def summary_markdown(summary: pd.DataFrame, metric: str = "fg_iou") -> str:
    """Mean ± sample std (n seeds) [image interval] per cell, one row per model and one column per test set."""

    def cell(row: pd.Series) -> str:
        std = row[f"{metric}_std"]
        spread = "n/a" if pd.isna(std) else f"{std:.3f}"
        mean = row[f"{metric}_mean"]
        interval = _interval_text(row.get(f"{metric}_ci_low", np.nan), row.get(f"{metric}_ci_high", np.nan))
        return f"{'n/a' if pd.isna(mean) else f'{mean:.3f}'} ± {spread} ({int(row[f'{metric}_n'])}){interval}"

    index = ["backbone", "regime", "train_set", "alignment"]
    if "n_train_slices" in summary.columns and summary["n_train_slices"].nunique() > 1:
        index.append("n_train_slices")
    table = summary.assign(value=summary.apply(cell, axis=1)).pivot_table(
        index=index, columns="test_set", values="value", aggfunc="first"
    )
    names = {"fg_iou": "Foreground IoU on each test set", "obj_f1": "Object F1 (2-D, IoU >= 0.5) on each test set"}
    name = names.get(metric, metric)
    header = f"{name}: mean ± sample std over seeds (n seeds)"
    if f"{metric}_ci_low" in summary.columns and summary[f"{metric}_ci_low"].notna().any():
        header += " [95 % bootstrap interval over test images of that mean]"
    # A model not scored on a test set (evaluation.test_sets) has no cell: empty, not "nan".
    return header + "\n\n" + table.reset_index().fillna("").to_markdown(index=False) + "\n"
