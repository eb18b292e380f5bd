"""The HTML pages of `snakemake --report`: the summary table, each dataset's integrity report,
each backbone's domain-analysis tables, as small self-contained pages."""

from __future__ import annotations

import html
import json
from typing import Any

import pandas as pd

# The columns of the domain analysis a reader sees: on its HTML page and in its summary.json.
FRECHET_COLUMNS = [
    "view",
    "dataset_a",
    "dataset_b",
    "variant",
    "value",
    "excess",
    "ci_low",
    "ci_high",
    "ci_method",
    "null_q95",
    "p_value",
    "n_a",
    "n_b",
    "n_groups_a",
    "n_groups_b",
    "dim",
]
PROBE_COLUMNS = [
    "view",
    "task",
    "balanced_accuracy_mean",
    "balanced_accuracy_std",
    "roc_auc_mean",
    "roc_auc_std",
    "chance_balanced_accuracy",
    "n_per_class",
    "n_groups_per_class",
]

# What names one model in the summary: a cell must never mix a plain and an aligned model.
# n_train_slices: a label-efficiency sweep trains each model at several sizes (where summary.csv has it)
MODEL_KEYS = ["backbone", "regime", "train_set", "alignment", "n_train_slices"]

STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
"""


def page(title: str, parts: list[str]) -> str:
    body = "\n".join(parts)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n"
    )


def table(frame: pd.DataFrame, caption: str, digits: int = 3) -> str:
    formatted = frame.copy()
    for column in formatted.columns:
        if pd.api.types.is_float_dtype(formatted[column]):
            formatted[column] = formatted[column].map(
                lambda v: "" if pd.isna(v) else f"{v:.{digits}g}" if abs(v) >= 1000 else f"{v:.{digits}f}"
            )
    out = formatted.to_html(index=False, na_rep="", border=0)
    end = out.index(">") + 1  # after the opening <table ...> tag
    return f"{out[:end]}<caption>{html.escape(caption)}</caption>{out[end:]}"


def summary_page(summary: pd.DataFrame) -> str:
    """One wide table per metric: a row per model (alignment included), a column per test set."""

    def cell(row, metric):
        std = row[f"{metric}_std"]
        return f"{row[f'{metric}_mean']:.3f} ± {'n/a' if pd.isna(std) else f'{std:.3f}'} ({int(row[f'{metric}_n'])})"

    keys = [key for key in MODEL_KEYS if key in summary]
    repeated = summary[summary.duplicated(keys + ["test_set"], keep=False)]
    if len(repeated):
        raise ValueError(
            f"summary has several rows per model and test set: {repeated[keys + ['test_set']].to_dict('records')[:3]}"
        )
    # what sd and n pool (tables.summarise's n_over): seeds, or seeds × folds with k folds
    over = " or ".join(sorted(set(summary["n_over"].astype(str)))) if "n_over" in summary else "seeds"
    parts = []
    for metric, label in (
        ("fg_iou", "Foreground IoU"),
        ("fg_dice", "Foreground Dice"),
        ("mean_iou", "Mean IoU (both classes)"),
        *([("obj_f1", "Object F1 (2-D, IoU > 0.5)")] if "obj_f1_mean" in summary else []),
    ):
        wide = (
            summary.assign(value=summary.apply(cell, axis=1, metric=metric))
            .pivot_table(index=keys, columns="test_set", values="value", aggfunc="first")
            .reset_index()
        )
        wide.columns.name = None
        parts.append(
            table(wide, f"{label} per test set: mean ± sample sd (n {over}); native resolution, pooled over pixels")
        )
    if "weights" in summary and summary["weights"].fillna("").astype(str).str.len().any():
        weights = summary[["backbone", "weights"]].fillna("").drop_duplicates().sort_values("backbone")
        parts.append(
            table(weights, "Pretrained weights of each backbone: the entry of the weights manifest (fetch_weights)")
        )
    parts.append(table(summary, "Every column of results/tables/summary.csv"))
    return page("Segmentation results", parts)


def dataset_page(report: dict[str, Any]) -> str:
    facts = {key: value for key, value in report.items() if not isinstance(value, (dict, list))}
    facts.update({f"archive {k}": v for k, v in (report.get("archive") or {}).items()})
    facts["foreground_fraction_bounds"] = report.get("foreground_fraction_bounds")
    parts = [
        table(
            pd.DataFrame(
                {
                    "field": list(facts),
                    "value": [json.dumps(v) if not isinstance(v, str) else v for v in facts.values()],
                }
            ),
            "Provenance",
        )
    ]
    parts.append(
        "<p><b>Checks passed</b></p><ul>"
        + "".join(f"<li>{html.escape(c)}</li>" for c in report.get("checks", []))
        + "</ul>"
    )
    splits, slices = [], []
    for name, split in (report.get("splits") or {}).items():
        row = {"split": name}
        row.update(
            {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in split.items() if k != "slices"}
        )
        splits.append(row)
        slices += [{"split": name, **s} for s in split.get("slices", [])]
    if splits:
        parts.append(table(pd.DataFrame(splits), "Splits"))
    if report.get("split_info"):
        parts.append(f"<p><b>Split</b>: {html.escape(json.dumps(report['split_info']))}</p>")
    if slices:
        parts.append(table(pd.DataFrame(slices), "Slices"))
    return page(f"Dataset {report.get('dataset', '')}: integrity report", parts)


def analysis_page(backbone: str, frames: dict[str, pd.DataFrame]) -> str:
    frechet = frames["frechet"][FRECHET_COLUMNS + ["null_mean", "n_boot", "n_perm"]]
    probe = frames["probe"][PROBE_COLUMNS + ["n_splits", "pca_components"]]
    ood = frames["ood"][
        [
            "view",
            "reference",
            "query",
            "fraction_flagged",
            "n_flagged",
            "n_query",
            "reference_fraction_flagged",
            "percentile",
            "n_reference",
            "n_groups_reference",
            "n_groups_query",
        ]
    ]
    return page(
        f"Domain analysis: {backbone}",
        [
            table(frames["counts"], "Sample counts (n: vectors; n_groups: source images)"),
            table(
                frechet,
                "Fréchet distance per pair and estimator: plain value; excess = value − mean of its permutation null (what the gap adds above sampling noise at these counts) with its 95 % interval (the wider of the null's and the bootstrap's spread; covers 0 when there is no gap); permutation null of the plain value (95th percentile, p)",
            ),
            table(probe, "Linear dataset probe (cross-validated, grouped by image for tokens): mean ± sd over folds"),
            table(
                ood, "Mahalanobis OOD (Ledoit-Wolf): fraction of the query beyond the reference's out-of-fold threshold"
            ),
        ],
    )
