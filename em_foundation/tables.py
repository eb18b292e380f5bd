"""Aggregate every evaluation into the tables other tools rely on.

``runs.csv``: one row per (backbone, regime, training set, seed, test set).
``summary.csv`` / ``summary.md``: mean, sample standard deviation (ddof 1) and n per cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from em_foundation.evaluation.metrics import Counts, scores
from em_foundation.io import read_json

RUN_KEYS = ["backbone", "regime", "train_set", "alignment", "seed", "test_set"]
CELL_KEYS = ["backbone", "regime", "train_set", "alignment", "test_set"]
METRICS = ["fg_iou", "fg_dice", "mean_iou"]


def union_rows(rows: list[dict]) -> list[dict]:
    """A multi-dataset model scored on the union of its sources' test splits.

    Pixel counts are summed before the ratios are taken, so the union score is the
    pooled IoU over all those pixels, not a mean of the per-source IoUs.
    """
    by_run: dict[tuple, list[dict]] = {}
    for row in rows:
        by_run.setdefault(tuple(row[k] for k in RUN_KEYS[:-1]), []).append(row)
    unions = []
    for members in by_run.values():
        sources = list(members[0]["train_datasets"])
        scored = [row for row in members if row["test_set"] in sources]
        if len(sources) < 2 or len(scored) != len(sources):
            continue
        total = Counts(*(sum(int(row[k]) for row in scored) for k in ("tp", "fp", "fn", "tn")))
        unions.append({**{k: v for k, v in scored[0].items() if k in RUN_KEYS or k == "train_datasets"},
                       "test_set": "+".join(sources), **scores(total), "n_images": sum(int(r["n_images"]) for r in scored)})
    return unions


def collect_runs(metric_files: Iterable[str | Path]) -> pd.DataFrame:
    rows = [read_json(path) for path in metric_files]
    for row in rows:
        row.setdefault("alignment", "none")
    runs = pd.DataFrame(rows + union_rows(rows))
    if runs.empty:
        raise ValueError("no evaluation results to aggregate")
    runs["in_domain"] = [set(test.split("+")) <= set(datasets) for test, datasets in zip(runs["test_set"], runs["train_datasets"])]
    runs["train_datasets"] = runs["train_datasets"].map("+".join)
    first = RUN_KEYS + METRICS + ["n_pixels", "n_images", "in_domain"]
    return runs[first + [c for c in runs.columns if c not in first]].sort_values(RUN_KEYS, ignore_index=True)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    grouped = runs.groupby(CELL_KEYS, sort=True)
    summary = grouped[METRICS].agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat if stat != 'count' else 'n'}" for metric, stat in summary.columns]
    summary["seeds"] = grouped["seed"].agg(lambda s: " ".join(map(str, sorted(s))))
    summary["in_domain"] = grouped["in_domain"].first()
    return summary.reset_index()


def summary_markdown(summary: pd.DataFrame, metric: str = "fg_iou") -> str:
    """Mean ± sample std (n) per cell, one row per model and one column per test set."""
    def cell(row: pd.Series) -> str:
        std = row[f"{metric}_std"]
        spread = "n/a" if pd.isna(std) else f"{std:.3f}"
        mean = row[f"{metric}_mean"]
        return f"{'n/a' if pd.isna(mean) else f'{mean:.3f}'} ± {spread} ({int(row[f'{metric}_n'])})"

    table = summary.assign(value=summary.apply(cell, axis=1)).pivot_table(
        index=["backbone", "regime", "train_set", "alignment"], columns="test_set", values="value", aggfunc="first"
    )
    header = f"Foreground IoU on each test set: mean ± sample std (n seeds)\n\n" if metric == "fg_iou" else f"{metric}: mean ± sample std (n seeds)\n\n"
    # A model not scored on a test set (evaluation.test_sets) has no cell: empty, not "nan".
    return header + table.reset_index().fillna("").to_markdown(index=False) + "\n"
