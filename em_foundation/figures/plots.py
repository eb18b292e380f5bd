"""Figure builders: each takes tables (or small arrays) and returns a matplotlib Figure."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.tables import over_what


def _model_label(backbone: str, regime: str) -> str:
    return f"{backbone}\n{regime}"


def unaligned(table: pd.DataFrame) -> pd.DataFrame:
    """The main figures show the runs without domain alignment; alignment has its own figure."""
    return table[table["alignment"] == "none"] if "alignment" in table.columns else table


def image_interval(rows: list[pd.DataFrame], means: list[float], metric: str = "fg_iou") -> np.ndarray:
    """(2, n) distances below and above each mean to its 95 % image-bootstrap interval (0 where absent)."""
    low_key, high_key = f"{metric}_ci_low", f"{metric}_ci_high"
    errors = np.zeros((2, len(rows)))
    for k, (row, mean) in enumerate(zip(rows, means)):
        if len(row) and low_key in row and np.isfinite(row[low_key].iloc[0]):
            errors[:, k] = [max(0.0, mean - row[low_key].iloc[0]), max(0.0, row[high_key].iloc[0] - mean)]
    return errors


def draw_intervals(ax, x: np.ndarray, means, stds, intervals: np.ndarray, width: float) -> None:
    """Seed spread (black, on the bar) and image interval (grey, beside it), side by side."""
    ax.errorbar(x - width * 0.18, means, yerr=stds, fmt="none", ecolor="black", elinewidth=0.8, capsize=1.5)
    ax.errorbar(x + width * 0.18, means, yerr=intervals, fmt="none", ecolor="0.45", elinewidth=0.8, capsize=1.5)


INTERVAL_LABEL = "95 % interval over test images (none: too few test images)"


def interval_legend(over: str = "seeds") -> list:
    """Legend of draw_intervals; ``over``: what the sd pools (tables.over_what: seeds, or seeds × folds)."""
    return [
        plt.Line2D([], [], color="black", lw=0.8, label=f"± sd over {over}"),
        plt.Line2D([], [], color="0.45", lw=0.8, label=INTERVAL_LABEL),
    ]


def draw_references(
    ax, panel: pd.DataFrame, references: Sequence[dict[str, str]], train_set: str | None, metric: str = "fg_iou"
) -> None:
    """Each reference run's in-domain score (em_foundation/references.py) as a horizontal line
    across the panel, its 95 % image interval shaded: where the baselines stand."""
    if train_set is None:
        return
    for k, reference in enumerate(references):
        row = panel[
            (panel["backbone"] == reference["backbone"])
            & (panel["regime"] == reference["regime"])
            & (panel["train_set"] == train_set)
        ]
        if not len(row):
            continue
        color = f"C{(k + 3) % 10}"  # the bars use the first colours, one per training set
        ax.axhline(row[f"{metric}_mean"].iloc[0], color=color, ls=reference["style"], lw=0.9, label=reference["label"])
        low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
        if low is not None and np.isfinite(low.iloc[0]):
            ax.axhspan(low.iloc[0], high.iloc[0], color=color, alpha=0.12, lw=0)


def iou_bars(
    summary: pd.DataFrame,
    metric: str = "fg_iou",
    references: Sequence[dict[str, str]] = (),
    in_domain: dict[str, str] | None = None,
) -> plt.Figure:
    """Foreground IoU per backbone × regime, bars per training set, one panel per test set.

    Each bar carries two error bars side by side: the sample sd over seeds (training noise)
    and the 95 % bootstrap interval over test images (which slices were drawn).
    ``references`` (references.reference_runs) are also drawn as lines at their in-domain
    score (``in_domain``: test set -> the training set of that dataset alone).
    """
    summary = unaligned(summary)
    test_sets = sorted(summary["test_set"].unique())
    train_sets = list(dict.fromkeys(summary["train_set"]))
    models = list(dict.fromkeys(zip(summary["backbone"], summary["regime"])))
    panel_width = max(2.3, 0.45 * len(models))
    figure, axes = plt.subplots(
        1, len(test_sets), sharey=True, squeeze=False, figsize=(max(3.4, panel_width * len(test_sets)), 2.6)
    )
    width = 0.8 / len(train_sets)
    for ax, test_set in zip(axes[0], test_sets):
        panel = summary[summary["test_set"] == test_set]
        for k, train_set in enumerate(train_sets):
            rows = [
                panel[(panel["backbone"] == b) & (panel["regime"] == r) & (panel["train_set"] == train_set)]
                for b, r in models
            ]
            means = [row[f"{metric}_mean"].iloc[0] if len(row) else np.nan for row in rows]
            stds = [row[f"{metric}_std"].fillna(0).iloc[0] if len(row) else 0 for row in rows]
            x = np.arange(len(models)) + (k - (len(train_sets) - 1) / 2) * width
            ax.bar(x, means, width, label=f"trained on {train_set}")
            draw_intervals(ax, x, means, stds, image_interval(rows, means, metric), width)
        draw_references(ax, panel, references, (in_domain or {}).get(test_set), metric)
        many = len(models) > 4  # long labels side by side would overlap
        ax.set_xticks(
            np.arange(len(models)),
            [" ".join(m) if many else _model_label(*m) for m in models],
            rotation=30 if many else 0,
            ha="right" if many else "center",
        )
        ax.set_title(f"test set: {test_set}")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"foreground IoU (mean over {over_what(summary)})")
    handles, _ = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles=handles + interval_legend(over_what(summary)), loc="upper right", fontsize=5)
    figure.tight_layout()
    return figure


def cross_domain_matrix(summary: pd.DataFrame, metric: str = "fg_iou") -> plt.Figure:
    """Heatmap per backbone × regime: rows the training set, columns the single test sets.

    Each cell: mean over seeds, ± sd over seeds, and [95 % interval over test images].
    """
    summary = unaligned(summary[~summary["test_set"].str.contains("+", regex=False)])
    models = list(dict.fromkeys(zip(summary["backbone"], summary["regime"])))
    n_cols = min(3, len(models))
    n_rows = int(np.ceil(len(models) / n_cols))
    figure, axes = plt.subplots(
        n_rows, n_cols, squeeze=False, figsize=(2.2 * n_cols + 0.8, 2.1 * n_rows), layout="constrained"
    )
    train_sets = list(dict.fromkeys(summary["train_set"]))
    test_sets = sorted(summary["test_set"].unique())
    image = None
    for ax, (backbone, regime) in zip(axes.flat, models):
        cell = summary[(summary["backbone"] == backbone) & (summary["regime"] == regime)]

        def pivot(column):
            if column not in cell:
                return np.full((len(train_sets), len(test_sets)), np.nan)
            return (
                cell.pivot_table(index="train_set", columns="test_set", values=column, dropna=False)
                .reindex(index=train_sets, columns=test_sets)
                .to_numpy()
            )

        matrix, spread, low, high = (pivot(f"{metric}_{stat}") for stat in ("mean", "std", "ci_low", "ci_high"))
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                text = f"{value:.2f}" + (f"\n±{spread[i, j]:.2f}" if np.isfinite(spread[i, j]) else "")
                if np.isfinite(low[i, j]):
                    text += f"\n[{low[i, j]:.2f}, {high[i, j]:.2f}]"
                ax.text(j, i, text, ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=4.5)
        ax.set_xticks(range(len(test_sets)), test_sets)
        ax.set_yticks(range(len(train_sets)), train_sets if ax in axes[:, 0] else [])
        ax.set_xlabel("test set")
        if ax in axes[:, 0]:
            ax.set_ylabel("training set")
        ax.set_title(f"{backbone} / {regime}")
        ax.grid(False)
    for ax in axes.flat[len(models) :]:
        ax.axis("off")
    if image is not None:
        over = over_what(summary)
        figure.colorbar(image, ax=axes, shrink=0.8, label=f"foreground IoU (mean over {over})")
        figure.suptitle(
            f"mean, ± sd over {over}, [95 % block-bootstrap interval over test images; none: too few images]",
            fontsize=7,
        )
    return figure


def qualitative_panel(examples: list[dict]) -> plt.Figure:
    """Per dataset two rows. Top: image, truth, then each model's prediction. Below each
    prediction, the overlay view: its contour over the image, false positives and misses coloured.

    Each example is {"dataset", "image", "truth", "predictions": {label: mask}}.
    """
    n_pred = max(len(example["predictions"]) for example in examples)
    n_cols = 2 + n_pred
    scale = min(1.0, 7.0 / (1.4 * n_cols))
    figure, axes = plt.subplots(
        2 * len(examples), n_cols, squeeze=False, figsize=(min(7.0, 1.4 * n_cols), 1.45 * 2 * len(examples) * scale)
    )
    for index, example in enumerate(examples):
        row, overlay = axes[2 * index], axes[2 * index + 1]
        row[0].imshow(example["image"], cmap="gray")
        row[0].set_ylabel(example["dataset"])
        row[1].imshow(example["truth"] == 1, cmap="magma", vmin=0, vmax=1)
        if index == 0:
            row[0].set_title("image")
            row[1].set_title("truth")
        for column, (label, mask) in enumerate(example["predictions"].items(), start=2):
            row[column].imshow(mask, cmap="magma", vmin=0, vmax=1)
            row[column].set_title(label, fontsize=6)
            error_overlay(overlay[column], example["image"], example["truth"], mask)
        overlay[0].text(
            0.0,
            0.5,
            "overlay:\nprediction contour (yellow)\nfalse positive (red)\nmissed (blue)",
            fontsize=5,
            va="center",
            transform=overlay[0].transAxes,
        )
        for ax in (*row, *overlay):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.spines[:].set_visible(False)
        for ax in (*row[2 + len(example["predictions"]) :], *overlay[1:2], *overlay[2 + len(example["predictions"]) :]):
            ax.axis("off")
        overlay[0].axis("off")
    figure.tight_layout()
    return figure


def learning_curves(logs: pd.DataFrame) -> plt.Figure:
    """Validation loss per epoch, one panel per backbone × regime, a line per run."""
    logs = unaligned(logs)
    models = list(dict.fromkeys(zip(logs["backbone"], logs["regime"])))
    figure, axes = plt.subplots(1, len(models), squeeze=False, sharey=True, figsize=(max(3.4, 2.2 * len(models)), 2.3))
    for ax, (backbone, regime) in zip(axes[0], models):
        panel = logs[(logs["backbone"] == backbone) & (logs["regime"] == regime)]
        for k, ((train_set, seed), run) in enumerate(panel.groupby(["train_set", "seed"], sort=True)):
            colour = f"C{sorted(panel['train_set'].unique()).index(train_set)}"
            ax.plot(
                run["epoch"],
                run["val_loss"],
                color=colour,
                lw=0.8,
                alpha=0.8,
                label=train_set if seed == panel[panel["train_set"] == train_set]["seed"].min() else None,
            )
        ax.set_title(f"{backbone} / {regime}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("validation soft-Dice loss")
    axes[0][-1].legend()
    figure.tight_layout()
    return figure


def alignment_comparison(summary: pd.DataFrame, metric: str = "fg_iou") -> plt.Figure:
    """Per source test set: its single-dataset model, the paired model, and the paired model
    with each alignment variant; one panel per backbone × regime."""
    single = summary[~summary["test_set"].str.contains("+", regex=False)]
    multi_sets = sorted({t for t in single["train_set"]} - set(single["test_set"]))
    models = list(dict.fromkeys(zip(single["backbone"], single["regime"])))
    test_sets = sorted(single["test_set"].unique())
    variants = [a for a in dict.fromkeys(single["alignment"]) if a != "none"]
    bars = (
        ["single-dataset"] + [f"{m} / none" for m in multi_sets] + [f"{m} / {a}" for m in multi_sets for a in variants]
    )
    figure, axes = plt.subplots(
        1, len(models), squeeze=False, sharey=True, figsize=(min(7.0, max(3.4, 2.4 * len(models))), 2.8)
    )
    width = 0.8 / len(bars)
    for ax, (backbone, regime) in zip(axes[0], models):
        cell = single[(single["backbone"] == backbone) & (single["regime"] == regime)]
        for k, bar in enumerate(bars):
            values, errors = [], []
            for test_set in test_sets:
                if bar == "single-dataset":
                    rows = cell[
                        (cell["train_set"] == test_set) & (cell["test_set"] == test_set) & (cell["alignment"] == "none")
                    ]
                else:
                    train_set, alignment = bar.split(" / ")
                    rows = cell[
                        (cell["train_set"] == train_set)
                        & (cell["test_set"] == test_set)
                        & (cell["alignment"] == alignment)
                    ]
                values.append(rows[f"{metric}_mean"].iloc[0] if len(rows) else np.nan)
                errors.append(rows[f"{metric}_std"].fillna(0).iloc[0] if len(rows) else 0)
            ax.bar(
                np.arange(len(test_sets)) + (k - (len(bars) - 1) / 2) * width,
                values,
                width,
                yerr=errors,
                capsize=1,
                label=bar,
            )
        ax.set_xticks(np.arange(len(test_sets)), test_sets)
        ax.set_xlabel("test set (source)")
        ax.set_title(f"{backbone} / {regime}")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("foreground IoU (mean ± sd)")
    figure.legend(
        *axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=min(4, len(bars)), bbox_to_anchor=(0.5, 1.12)
    )
    figure.tight_layout()
    return figure


# The label-efficiency x-axis: every labelled slice a run uses, validation included.
LABELLED_SLICES_USED = "n_labelled_slices_used"
LABELLED_SLICES_AXIS = "labelled slices used (training + validation)"


def label_efficiency(summary: pd.DataFrame, metric: str = "fg_iou") -> plt.Figure:
    """Foreground IoU against the number of labelled slices a run uses (log axis), one panel per
    test set, one line per backbone × regime (× training set, dashed when cross-domain).

    The x value of a point counts every labelled slice the models used: the slices they
    trained on (``n_labelled_slices``: 'all' made a number) plus the validation slices that
    chose their epoch and thresholds (``n_validation_slices``), the same at every size. A
    count of training slices alone would credit a "1-slice" Lucchi++ run with 1 slice while
    it used 18. Shaded: mean ± sd over seeds (darker) and,
    where the table has it, the 95 % interval over test images of the mean (lighter).
    Only training sets trained at more than one size are drawn.
    """
    table = unaligned(summary[~summary["test_set"].astype(str).str.contains("+", regex=False)]).copy()
    table["n_train_slices"] = table["n_train_slices"].astype(str)
    swept = table.groupby("train_set")["n_train_slices"].nunique()
    table = table[table["train_set"].isin(swept[swept > 1].index)]
    if table.empty:
        raise ValueError("label_efficiency needs training.n_train_slices with more than one size")
    if "n_labelled_slices" not in table.columns or table["n_labelled_slices"].isna().any():
        raise ValueError("label_efficiency needs the n_labelled_slices column of summary.csv")
    if "n_validation_slices" not in table.columns or (table["n_validation_slices"].fillna(-1) < 0).any():
        raise ValueError(
            "label_efficiency needs the n_validation_slices column of summary.csv (the validation slices every run "
            "used); a run.json from before it was recorded lacks it: rerun that run's training and evaluation"
        )
    table[LABELLED_SLICES_USED] = table["n_labelled_slices"] + table["n_validation_slices"]
    test_sets = sorted(table["test_set"].unique())
    models = list(dict.fromkeys(zip(table["backbone"], table["regime"])))
    figure, axes = plt.subplots(
        1, len(test_sets), squeeze=False, sharey=True, figsize=(min(7.0, max(3.4, 2.6 * len(test_sets))), 2.6)
    )
    for ax, test_set in zip(axes[0], test_sets):
        panel = table[table["test_set"] == test_set]
        for k, (backbone, regime) in enumerate(models):
            for train_set, line in panel[(panel["backbone"] == backbone) & (panel["regime"] == regime)].groupby(
                "train_set"
            ):
                line = line.sort_values(LABELLED_SLICES_USED)
                x = line[LABELLED_SLICES_USED].to_numpy(float)
                mean = line[f"{metric}_mean"].to_numpy(float)
                sd = line[f"{metric}_std"].fillna(0).to_numpy(float)
                in_domain = bool(line["in_domain"].iloc[0]) if "in_domain" in line else train_set == test_set
                ax.plot(
                    x,
                    mean,
                    color=f"C{k}",
                    marker="o",
                    ms=2.5,
                    lw=1.0,
                    ls="-" if in_domain else "--",
                    label=f"{backbone} {regime} ({train_set})",
                )
                ax.fill_between(x, mean - sd, mean + sd, color=f"C{k}", alpha=0.25, lw=0)
                low, high = f"{metric}_ci_low", f"{metric}_ci_high"
                if low in line and line[low].notna().all():
                    ax.fill_between(x, line[low], line[high], color=f"C{k}", alpha=0.1, lw=0)
        ax.set_xscale("log")
        ticks = sorted(set(panel[LABELLED_SLICES_USED].astype(float)))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the sizes trained, not powers of ten
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"test: {test_set}")
        ax.set_xlabel(LABELLED_SLICES_AXIS)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"foreground IoU (mean over {over_what(summary)})")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [
        plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=0.35, label=f"± sd over {over_what(summary)}"),
        plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=0.12, label=INTERVAL_LABEL),
    ]
    figure.legend(handles=handles, loc="upper center", ncol=3, fontsize=5, bbox_to_anchor=(0.5, 1.15))
    figure.tight_layout()
    return figure


def error_overlay(ax, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> None:
    """The image with the prediction's contour (yellow), false positives (red) and misses (blue)."""
    known = truth != IGNORE_LABEL
    foreground, predicted = (truth == 1) & known, prediction.astype(bool) & known
    ax.imshow(image, cmap="gray")
    colours = np.zeros((*truth.shape, 4))
    colours[predicted & ~foreground] = (0.9, 0.1, 0.1, 0.55)  # false positive pixels
    colours[foreground & ~predicted] = (0.1, 0.4, 1.0, 0.55)  # missed pixels
    ax.imshow(colours)
    if predicted.any() and not predicted.all():
        ax.contour(predicted.astype(float), levels=[0.5], colors=["yellow"], linewidths=0.4)
