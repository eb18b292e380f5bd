"""Aggregate every evaluation into the tables other tools rely on.

``runs.csv``: one row per (backbone, regime, training set, seed, test set), with a 95 %
bootstrap interval over test images (``fg_iou_ci_low``/``fg_iou_ci_high``, ``n_images``) and
whether the training batches were augmented (``augment``: training.augment, none or flips_rot90)
and the run's training recipe (``recipe``: lr, batch size, ... with training.overrides applied).
Beside every published column (threshold 0.5, raw objects) the same score under the run's
own decision rules, chosen on its validation slices and recorded in its run.json: suffix
``_tuned`` at its threshold (``threshold_tuned``), ``_post`` after its post-processing as well
(holes filled, objects under ``min_size_post`` pixels removed); see evaluation/decision.py.
``summary.csv`` / ``summary.md``: mean, sample standard deviation (ddof 1) and n per cell
(the spread over seeds, or over seeds × folds with k folds), beside the 95 % bootstrap
interval over test images of that mean. ``paired.csv``: every comparison the figures draw
between two models (a union's model − the single-dataset model, on the same test images),
with the interval of the paired difference (evaluation/bootstrap.paired_difference).

Two sources of uncertainty, reported side by side because neither contains the other: the
seed spread says how much training noise moves a score on these test images; the image
interval says how much the score depends on which test slices happened to be drawn (VNC
has 3 of them). The image bootstrap (evaluation/bootstrap.py) resamples blocks of
consecutive slices, within each test set of a union and in stack order (serial sections
are correlated), and recomputes the pooled IoU ΣTP / Σ(TP+FP+FN) from the resampled slices'
counts; for a cell, every seed sees the same resample, and the seed mean is taken. Below
``min_images`` test images there is no interval: ``fg_iou_ci_note`` says "too few test
images", and ``fg_iou_ci_block`` gives the block length used per test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from em_foundation.data.splits import section_order
from em_foundation.evaluation.bootstrap import (
    MIN_IMAGES,
    ImageBootstrap,
    PairedSample,
    image_interval,
    paired_difference,
)
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
# Every regime's scores under its own decision rules, chosen on its validation slices
# (evaluation/decision.py): at its threshold (_tuned), and with its post-processing (_post),
# beside the published columns (0.5, raw objects); and the rules themselves.
DECISION_SUFFIXES = ("_tuned", "_post")
DECISION_METRICS = [m + suffix for suffix in DECISION_SUFFIXES for m in (*METRICS, *OBJECT_COLUMNS)]
DECISION_RULES = ["threshold_tuned", "min_size_post"]


def _union_decision_columns(scored: list[dict]) -> dict:
    """A union's _tuned and _post columns from its members' summed counts (where every member has them)."""
    union: dict = {}
    for suffix in DECISION_SUFFIXES:
        if not all(f"tp{suffix}" in row for row in scored):
            continue
        total = Counts(*(sum(int(row[k + suffix]) for row in scored) for k in ("tp", "fp", "fn", "tn")))
        union.update({key + suffix: value for key, value in scores(total).items()})
        counts = [counts_from(row, suffix) for row in scored]
        if all(c is not None for c in counts):
            union.update(scores_columns(sum(counts, ObjectCounts()), suffix))
    return union


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
                    if k in RUN_KEYS
                    or k
                    in (
                        "train_datasets",
                        "n_labelled_slices",
                        "n_validation_slices",
                        "augment",
                        "recipe",
                        "weights",
                        *DECISION_RULES,
                    )
                },
                "test_set": "+".join(sources),
                **scores(total),
                "n_images": sum(int(r["n_images"]) for r in scored),
                **_union_objects(scored),
                **_union_decision_columns(scored),
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


def pooled_iou_interval(
    counts: np.ndarray,
    strata: np.ndarray,
    n_boot: int,
    seed: int,
    ci: float = CI_LEVEL,
    block_length: int | None = None,
    min_images: int = MIN_IMAGES,
) -> tuple[float, float]:
    """Bootstrap interval over test images of the (seed-averaged) pooled foreground IoU.

    ``counts`` is (n_runs, n_images, 3): TP, FP, FN of each image for each run, every run
    on the same images in the same order (stack order within a test set); ``strata``
    (n_images,) names each image's test set, and blocks of consecutive images are resampled
    within their stratum, so a union keeps its composition (evaluation/bootstrap.py). NaN
    below ``min_images`` images. Seeded, so the same tables give the same interval.
    """
    boot = ImageBootstrap(n_boot=n_boot, seed=seed, block_length=block_length, min_images=min_images, ci=ci)
    interval = image_interval([(np.asarray(counts), np.asarray(strata))], boot)
    return interval.low, interval.high


def _interval_columns(interval) -> dict[str, object]:
    block = " ".join(f"{k}:{v}" for k, v in interval.block_lengths.items())
    return {
        "fg_iou_ci_low": interval.low,
        "fg_iou_ci_high": interval.high,
        "fg_iou_ci_note": interval.note,
        "fg_iou_ci_block": block,
    }


def _image_counts(
    by_run: dict[tuple, pd.DataFrame], run: tuple, test_sets: list[str]
) -> tuple[np.ndarray, np.ndarray, list]:
    """(strata, counts (n_images, 3), image keys) of one run on the named test sets, sorted by image."""
    frames = [by_run[(*run, test_set)] for test_set in test_sets if (*run, test_set) in by_run]
    if len(frames) != len(test_sets):
        return np.array([]), np.zeros((0, 3)), []
    images = pd.concat(frames, ignore_index=True)
    # stack order within each test set: the block bootstrap resamples runs of neighbours
    position = {name: i for i, name in enumerate(section_order(images["image"].astype(str).unique()))}
    images = images.assign(_position=images["image"].astype(str).map(position)).sort_values(
        ["test_set", "_position"], key=lambda c: c.astype(str) if c.name == "test_set" else c
    )
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
    runs: pd.DataFrame, per_image: pd.DataFrame, boot: ImageBootstrap, folds: dict[str, list] | None = None
) -> pd.DataFrame:
    """``fg_iou_ci_low`` / ``fg_iou_ci_high`` (``_note``, ``_block``) per run row from its slices' pixel counts."""
    by_run = _group_images(per_image, folds)
    columns = []
    for row in runs.itertuples(index=False):
        run = tuple(getattr(row, key) for key in IMAGE_KEYS[:-1])
        strata, counts, _ = _image_counts(by_run, run, row.test_set.split("+"))
        columns.append(_interval_columns(image_interval([(counts[None], strata)] if len(strata) else [], boot)))
    return runs.assign(**pd.DataFrame(columns, index=runs.index))


def collect_runs(
    metric_files: Iterable[str | Path],
    per_image: pd.DataFrame | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    folds: dict[str, list] | None = None,
    block_length: int | None = None,
    min_images: int = MIN_IMAGES,
) -> pd.DataFrame:
    """One row per run and test set; with ``per_image`` (the slices' counts) an image interval per row.

    ``block_length`` (None: chosen from each series) and ``min_images`` as in evaluation/bootstrap.py.

    ``folds`` (grid.fold_names): k-fold datasets and training sets are named by their
    dataset with a ``fold`` column (see apply_folds); without, no ``fold`` column.
    """
    rows = [read_json(path) for path in metric_files]
    for row in rows:
        row.setdefault("alignment", "none")
        row["n_train_slices"] = str(row.get("n_train_slices", "all"))
        row.setdefault("augment", "none")  # training.augment of the run (evaluations before it: none)
        row.setdefault("recipe", "")  # its training recipe (evaluations before it, and forests: none)
        row.setdefault("weights", "")  # its weights' manifest entry (random or file weights: none)
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
        boot = ImageBootstrap(n_boot=n_boot, seed=boot_seed, block_length=block_length, min_images=min_images)
        runs = add_image_intervals(runs, per_image, boot, folds)
    else:
        runs = runs.assign(fg_iou_ci_low=np.nan, fg_iou_ci_high=np.nan, fg_iou_ci_note="", fg_iou_ci_block="")
    keys = RUN_KEYS[:-1] + ["fold", "test_set"] if folds else RUN_KEYS
    if not folds:
        runs = runs.drop(columns="fold")
    first = keys + METRICS
    first += ["fg_iou_ci_low", "fg_iou_ci_high", "n_pixels", "n_images", "in_domain", "transductive", "augment"]
    first += [c for c in ("fg_iou_tuned", "fg_iou_post", "obj_f1", "obj_f1_tuned", "obj_f1_post") if c in runs]
    first += [c for c in DECISION_RULES if c in runs]
    return runs[first + [c for c in runs.columns if c not in first]].sort_values(keys, ignore_index=True)


def summarise(
    runs: pd.DataFrame,
    per_image: pd.DataFrame | None = None,
    n_boot: int = 1000,
    boot_seed: int = 0,
    folds: dict[str, list] | None = None,
    block_length: int | None = None,
    min_images: int = MIN_IMAGES,
) -> pd.DataFrame:
    """Mean, sample std (ddof 1) and n over seeds per cell; with ``per_image``, the image interval of the mean.

    With k folds, a cell's runs are its seeds × folds (``n_over``: "seeds × folds"); every
    fold has its own test images, resampled on their own, and the interval is that of the
    mean over all of them (none below ``min_images`` images in all).
    """
    runs = with_n_train_slices(runs if "fold" in runs.columns else runs.assign(fold=NO_FOLD))
    grouped = runs.groupby(CELL_KEYS, sort=True)
    metrics = METRICS + [m for m in OBJECT_METRICS + DECISION_METRICS + DECISION_RULES if m in runs.columns]
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
    if "recipe" in runs.columns:  # the regime's training recipe (training.overrides applied)
        summary["recipe"] = grouped["recipe"].agg(lambda a: " | ".join(sorted(set(map(str, a)))))
    if "weights" in runs.columns:  # the manifest entry of the weights (one per backbone)
        summary["weights"] = grouped["weights"].agg(lambda a: " | ".join(sorted(set(map(str, a)))))
    summary["n_images"] = runs.drop_duplicates(CELL_KEYS + ["fold"]).groupby(CELL_KEYS, sort=True)["n_images"].sum()
    if folds:
        summary["folds"] = grouped["fold"].agg(lambda f: " ".join(map(str, sorted(set(f)))))
    # what sd and n pool: folds enter where a cell has several (the labels say so)
    summary["n_over"] = grouped["fold"].agg(lambda f: "seeds × folds" if f.nunique() > 1 else "seeds")
    summary = summary.reset_index()
    boot = ImageBootstrap(n_boot=n_boot, seed=boot_seed, block_length=block_length, min_images=min_images)
    by_run = _group_images(per_image, folds) if per_image is not None else {}
    columns = []
    for cell in summary.itertuples(index=False):
        key = {k: getattr(cell, k) for k in CELL_KEYS}
        folds_of_cell = _cell_folds(runs, key, by_run)
        if by_run and folds_of_cell is not None:
            columns.append(_interval_columns(image_interval(folds_of_cell, boot)))
        else:
            columns.append(
                {"fg_iou_ci_low": np.nan, "fg_iou_ci_high": np.nan, "fg_iou_ci_note": "", "fg_iou_ci_block": ""}
            )
    summary = summary.assign(**pd.DataFrame(columns, index=summary.index))
    first = CELL_KEYS + ["fg_iou_mean", "fg_iou_std", "fg_iou_n", "fg_iou_ci_low", "fg_iou_ci_high", "n_images"]
    return summary[first + [c for c in summary.columns if c not in first]]


def _cell_folds(runs: pd.DataFrame, key: dict, by_run: dict) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(counts (n_seeds, n_images, 3), strata) of each fold of one cell, folds in order; None if any is missing."""
    members = runs[(runs[CELL_KEYS] == pd.Series(key)).all(axis=1)]
    folds = []
    for fold, fold_runs in members.groupby("fold"):
        stacked, strata, images = [], None, None
        for seed in sorted(fold_runs["seed"]):
            run = tuple(key[k] for k in CELL_KEYS[:-1]) + (int(seed), int(fold))
            strata_, counts, keys = _image_counts(by_run, run, str(key["test_set"]).split("+"))
            if images is not None and keys != images:
                raise ValueError(f"seeds of cell {key} were scored on different test images; cannot pair them")
            strata, images = strata_, keys
            stacked.append(counts)
        if not images:
            return None
        folds.append((np.stack(stacked), strata))
    return folds or None


def paired_differences(
    runs: pd.DataFrame,
    per_image: pd.DataFrame,
    n_boot: int = 1000,
    boot_seed: int = 0,
    folds: dict[str, list] | None = None,
    block_length: int | None = None,
    min_images: int = MIN_IMAGES,
) -> pd.DataFrame:
    """``paired.csv``: each union model − the single-dataset model on the single dataset's test images.

    One row per (backbone, regime, alignment, n_train_slices, test_set, union): ``fg_iou_diff``
    (mean over seeds (× folds) of the union's model minus that of the model trained on the
    test set's own dataset), its 95 % paired image-bootstrap interval (``fg_iou_diff_ci_low``,
    ``_high``; NaN and ``ci_note`` below ``min_images``), ``n_images`` and the runs behind each
    side. These are the comparisons the ``paired`` figure draws.
    """
    runs = with_n_train_slices(runs if "fold" in runs.columns else runs.assign(fold=NO_FOLD))
    by_run = _group_images(per_image, folds)
    boot = ImageBootstrap(n_boot=n_boot, seed=boot_seed, block_length=block_length, min_images=min_images)
    model_keys = ["backbone", "regime", "alignment", "n_train_slices"]
    rows = []
    single_test = runs[runs["train_datasets"].astype(str) == runs["test_set"].astype(str)]
    for (*model, test_set), single in single_test.groupby(model_keys + ["test_set"], sort=True):
        train_single = single["train_set"].iloc[0]
        same = (runs[model_keys] == pd.Series(dict(zip(model_keys, model)))).all(axis=1) & (
            runs["test_set"] == test_set
        )
        unions = runs[same & runs["train_datasets"].astype(str).map(lambda d: "+" in d and test_set in d.split("+"))]
        for union, _ in unions.groupby("train_set", sort=True):
            samples = []
            for fold in sorted(set(single["fold"])):
                sides = []
                for train_set in (union, train_single):
                    key = dict(zip(model_keys, model), train_set=train_set, test_set=test_set)
                    key = {k: key[k] for k in CELL_KEYS}
                    fold_runs = runs[(runs[CELL_KEYS] == pd.Series(key)).all(axis=1) & (runs["fold"] == fold)]
                    cell = _cell_folds(fold_runs, key, by_run)
                    sides.append(cell[0] if cell else None)
                if sides[0] is None or sides[1] is None:
                    continue
                samples.append(PairedSample(a=sides[0][0], b=sides[1][0], strata=sides[1][1]))
            if not samples:
                continue
            result = paired_difference(samples, boot)
            rows.append(
                {
                    **dict(zip(model_keys, model)),
                    "test_set": test_set,
                    "train_set_a": union,
                    "train_set_b": train_single,
                    **result.as_dict("fg_iou_diff"),
                }
            )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


PAIRED_COLUMNS = [
    "backbone",
    "regime",
    "alignment",
    "n_train_slices",
    "test_set",
    "train_set_a",
    "train_set_b",
    "fg_iou_diff",
    "fg_iou_diff_ci_low",
    "fg_iou_diff_ci_high",
    "n_images",
    "n_runs_a",
    "n_runs_b",
    "ci_note",
]


def _interval_text(low: float, high: float, note: object = "") -> str:
    if isinstance(note, str) and note:
        return f" [{note}]"
    return "" if pd.isna(low) or pd.isna(high) else f" [{low:.3f}, {high:.3f}]"


def over_what(summary: pd.DataFrame) -> str:
    """What a summary's sd and n pool: "seeds", or "seeds × folds" where some cell pools folds."""
    if "n_over" in summary.columns and (summary["n_over"] == "seeds × folds").any():
        return "seeds × folds"
    return "seeds"


def summary_markdown(summary: pd.DataFrame, metric: str = "fg_iou") -> str:
    """Mean ± sample std (n seeds, or seeds × folds) [image interval] per cell, one row per model and one column per test set."""

    def cell(row: pd.Series) -> str:
        std = row[f"{metric}_std"]
        spread = "n/a" if pd.isna(std) else f"{std:.3f}"
        mean = row[f"{metric}_mean"]
        interval = _interval_text(
            row.get(f"{metric}_ci_low", np.nan), row.get(f"{metric}_ci_high", np.nan), row.get(f"{metric}_ci_note", "")
        )
        return f"{'n/a' if pd.isna(mean) else f'{mean:.3f}'} ± {spread} ({int(row[f'{metric}_n'])}){interval}"

    index = ["backbone", "regime", "train_set", "alignment"]
    if "n_train_slices" in summary.columns and summary["n_train_slices"].nunique() > 1:
        index.append("n_train_slices")
    table = summary.assign(value=summary.apply(cell, axis=1)).pivot_table(
        index=index, columns="test_set", values="value", aggfunc="first"
    )
    names = {"fg_iou": "Foreground IoU on each test set", "obj_f1": "Object F1 (2-D, IoU > 0.5) on each test set"}
    name = names.get(metric, metric)
    over = over_what(summary)
    header = f"{name}: mean ± sample std over {over} (n {over})"
    low_key, note_key = f"{metric}_ci_low", f"{metric}_ci_note"
    has_notes = note_key in summary.columns and summary[note_key].fillna("").astype(bool).any()
    if (low_key in summary.columns and summary[low_key].notna().any()) or has_notes:
        header += (
            " [95 % block-bootstrap interval over test images of that mean (runs of consecutive sections);"
            " none where there are too few test images]"
        )
    # A model not scored on a test set (evaluation.test_sets) has no cell: empty, not "nan".
    return header + "\n\n" + table.reset_index().fillna("").to_markdown(index=False) + "\n"
