"""Figures of the domain analysis and of the paired-training comparison.

Each builder takes tidy tables (the CSVs of rule domain_analysis, or summary.csv) and returns
a matplotlib Figure sized for a two-column paper (at most 7 in wide); the style comes from
:func:`em_foundation.figures.style.use_style`, which the entry point applies first. Every
panel states its sample counts (defect 6 in docs/published-setup.md): n vectors and, for patch tokens,
the number of source images that folds, bootstrap and permutations move as units.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from em_foundation.figures.plots import draw_intervals, image_interval, interval_legend
from em_foundation.tables import over_what

__all__ = [
    "frechet_matrix",
    "paired_comparison",
    "pca_scatter",
    "probe_accuracy",
]

MAX_WIDTH = 7.0  # inches: a two-column paper's full width
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
VIEW_ORDER = ["pooled", "tokens", "pooled-featstd", "tokens-featstd"]
VIEW_LABEL = {
    "pooled": "per-image embedding",
    "tokens": "patch tokens",
    # The same, after per-dataset feature standardisation (alignment variant featstd).
    "pooled-featstd": "per-image, standardised per dataset",
    "tokens-featstd": "tokens, standardised per dataset",
}


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _grid(n_rows: int, n_cols: int, panel_w: float, panel_h: float, max_width: float = MAX_WIDTH, **kw: Any):
    width = min(max_width, panel_w * n_cols + 0.4)
    return plt.subplots(n_rows, n_cols, squeeze=False, figsize=(width, panel_h * n_rows + 0.5), **kw)


def _dataset_style(datasets: Sequence[str]) -> dict[str, dict[str, str]]:
    return {d: {"color": f"C{k % 8}", "marker": MARKERS[k % len(MARKERS)]} for k, d in enumerate(datasets)}


def _counts_text(n: int, groups: int | None) -> str:
    return f"{n}" if groups is None or groups == n else f"{n} ({groups} img)"


def pca_scatter(pca: pd.DataFrame, counts: pd.DataFrame | None = None) -> plt.Figure:
    """PC1/PC2 scatter coloured by dataset: one column per backbone, one row per view.

    Axis labels carry each component's explained-variance ratio; each panel's title gives
    the counts per dataset (vectors, and source images for patch tokens, from ``counts``).
    """
    backbones = list(dict.fromkeys(pca["backbone"]))
    views = _ordered(pca["view"], VIEW_ORDER)
    datasets = list(dict.fromkeys(pca["dataset"]))
    style = _dataset_style(datasets)
    figure, axes = _grid(len(views), len(backbones), 2.3, 2.1)
    for i, view in enumerate(views):
        for j, backbone in enumerate(backbones):
            ax = axes[i][j]
            panel = pca[(pca["backbone"] == backbone) & (pca["view"] == view)]
            if panel.empty:
                ax.axis("off")
                continue
            many = len(panel) > 400
            ns, images = [], []
            for dataset in datasets:
                rows = panel[panel["dataset"] == dataset]
                if rows.empty:
                    continue
                ns.append(len(rows))
                if counts is not None:
                    match = counts[
                        (counts["backbone"] == backbone) & (counts["view"] == view) & (counts["dataset"] == dataset)
                    ]
                    if len(match):
                        images.append(int(match["n_groups"].iloc[0]))
                ax.scatter(
                    rows["pc1"],
                    rows["pc2"],
                    s=2 if many else 10,
                    alpha=0.3 if many else 0.8,
                    linewidths=0,
                    rasterized=many,
                    label=dataset,
                    **style[dataset],
                )
            ev1, ev2 = panel["explained_variance_pc1"].iloc[0], panel["explained_variance_pc2"].iloc[0]
            ax.set_xlabel(f"PC1 ({ev1:.0%} var.)")
            ax.set_ylabel(f"PC2 ({ev2:.0%} var.)")
            n_text = " + ".join(map(str, ns))
            if images and images != ns:
                n_text += f" ({' + '.join(map(str, images))} img)"
            ax.set_title(f"{backbone}: {VIEW_LABEL.get(view, view)}\nn = {n_text}", fontsize=7)
            ax.grid(False)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], ls="", ms=5, label=d, **style[d]) for d in datasets]
    figure.legend(handles=handles, loc="lower center", ncol=len(datasets), bbox_to_anchor=(0.5, 0.0))
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return figure


def _pick_variant(frechet: pd.DataFrame, variant: str | None) -> str:
    variants = list(dict.fromkeys(frechet["variant"]))
    if variant is not None:
        if variant not in variants:
            raise ValueError(f"Fréchet variant {variant!r} not in the table ({', '.join(variants)})")
        return variant
    if "ledoit_wolf" in variants:
        return "ledoit_wolf"
    return next((v for v in variants if v.startswith("pca")), variants[0])


def frechet_matrix(frechet: pd.DataFrame, variant: str | None = None) -> plt.Figure:
    """Fréchet distance between every pair of datasets, one matrix per backbone and view.

    Cells show the distance above the permutation null (FD − mean null FD, the tables'
    ``excess``) with its 95 % interval (frechet.frechet_excess), the plain distance, and the plain distance's ratio to the permutation null's 95th
    percentile (the null is computed with the plain estimator too); colour is that ratio on a log scale (comparable across backbones
    whose features have different scales; ratio <= 1 means no larger than sampling noise).
    Tick labels carry each dataset's n. Without a permutation null, colour is the distance.
    """
    variant = _pick_variant(frechet, variant)
    table = frechet[frechet["variant"] == variant]
    # Tables written before the excess carry bootstrap intervals (basic: around the bias-corrected value).
    methods = set(table["ci_method"].dropna()) if "ci_method" in table else {"percentile"}
    excess = "excess" in table.columns and table["excess"].notna().any()
    basic = methods == {"basic"}
    backbones = list(dict.fromkeys(table["backbone"]))
    views = _ordered(table["view"], VIEW_ORDER)
    datasets = list(dict.fromkeys(list(table["dataset_a"]) + list(table["dataset_b"])))
    k = len(datasets)
    has_null = table["null_q95"].notna().any() and (table["null_q95"] > 0).all()
    ratios = (table["value"] / table["null_q95"]).to_numpy() if has_null else table["value"].to_numpy()
    finite = ratios[np.isfinite(ratios) & (ratios > 0)]
    vmin = min(0.5, finite.min()) if len(finite) else 0.5
    vmax = max(2.0, finite.max()) if len(finite) else 2.0
    norm = LogNorm(vmin=vmin, vmax=vmax)
    size = 0.75 * k + 0.9
    figure, axes = _grid(
        len(views), len(backbones), max(2.0, size), max(1.9, size), max_width=MAX_WIDTH - 0.4, layout="constrained"
    )  # the colour bar's label can reach past the canvas
    figure.get_layout_engine().set(h_pad=0.08, hspace=0.06)  # keep tick labels off the next row's titles
    image = None
    for i, view in enumerate(views):
        for j, backbone in enumerate(backbones):
            ax = axes[i][j]
            panel = table[(table["backbone"] == backbone) & (table["view"] == view)]
            if panel.empty:
                ax.axis("off")
                continue
            colour = np.full((k, k), np.nan)
            labels = {d: d for d in datasets}
            for row in panel.itertuples():
                a, b = datasets.index(row.dataset_a), datasets.index(row.dataset_b)
                ratio = row.value / row.null_q95 if has_null else row.value
                colour[a, b] = colour[b, a] = ratio
                if excess and np.isfinite(row.ci_low):
                    text = f"{row.excess:+.3g}\n[{row.ci_low:+.3g}, {row.ci_high:+.3g}]\nplain {row.value:.3g}"
                elif basic and np.isfinite(row.ci_low):
                    text = f"{row.value_debiased:.3g}\n[{row.ci_low:.3g}, {row.ci_high:.3g}]\nplain {row.value:.3g}"
                elif np.isfinite(row.ci_low):
                    text = f"{row.value:.3g}\n[{row.ci_low:.3g}, {row.ci_high:.3g}]"
                else:
                    text = f"{row.value:.3g}"
                if has_null:
                    text += f"\n{ratio:.1f}× null"
                for r, c in ((a, b), (b, a)):
                    light = norm(ratio) > 0.55 if np.isfinite(ratio) and ratio > 0 else True
                    ax.text(c, r, text, ha="center", va="center", fontsize=5.5, color="black" if light else "white")
                labels[row.dataset_a] = f"{row.dataset_a}\nn={_counts_text(row.n_a, row.n_groups_a)}"
                labels[row.dataset_b] = f"{row.dataset_b}\nn={_counts_text(row.n_b, row.n_groups_b)}"
            masked = np.ma.masked_invalid(np.where(colour > 0, colour, np.nan))
            cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
            image = ax.imshow(masked, cmap=cmap, norm=norm)
            for d in range(k):
                ax.text(d, d, "—", ha="center", va="center", fontsize=7, color="0.4")
            ax.set_xticks(range(k), [labels[d] for d in datasets], fontsize=6)
            ax.set_yticks(range(k), datasets if j == 0 else [], fontsize=6)
            ax.tick_params(length=0)
            ax.grid(False)
            for spine in ax.spines.values():
                spine.set_visible(False)
            dim = int(panel["dim"].iloc[0])
            ax.set_title(f"{backbone}: {VIEW_LABEL.get(view, view)}\n(d={dim})", fontsize=7)
    if image is not None:
        label = "FD / permutation-null 95th pct." if has_null else "Fréchet distance"
        bar = figure.colorbar(image, ax=axes, shrink=0.7, label=label, pad=0.02, aspect=30)
        ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if vmin <= t <= vmax]
        if has_null and len(ticks) >= 2:  # plain numbers, not 2×10^0
            bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
            bar.minorticks_off()
    if excess:
        how = "FD − mean permutation-null FD [95 % interval]; plain FD below"
    elif basic:
        how = "bootstrap bias-corrected (2·FD − mean of bootstrap FDs), basic bootstrap 95 % interval; plain FD below"
    else:
        how = "plain FD, bootstrap percentile 95 % interval"
    figure.suptitle(f"Fréchet distance ({variant.replace('_', '-')}): {how}", fontsize=7)
    return figure


def _per_class(text: Any) -> str:
    if not isinstance(text, str) or not text:
        return ""
    return " vs ".join(part.split("=", 1)[1] for part in text.split(";"))


def probe_accuracy(probe: pd.DataFrame) -> plt.Figure:
    """Linear dataset probe: balanced accuracy and ROC-AUC per backbone, bars per view.

    Error bars are the standard deviation over cross-validation folds; the dashed line is
    chance. Below each backbone: the images per class (token folds move whole images).
    """
    views = _ordered(probe["view"], VIEW_ORDER)
    tasks = list(dict.fromkeys(probe["task"]))
    groups = list(dict.fromkeys(zip(probe["backbone"], probe["task"])))
    figure, axes = plt.subplots(1, 2, squeeze=False, figsize=(min(MAX_WIDTH, 1.2 + 1.3 * len(groups) * 2), 2.5))
    width = 0.8 / len(views)
    x = np.arange(len(groups))
    for ax, (metric, label) in zip(axes[0], (("balanced_accuracy", "balanced accuracy"), ("roc_auc", "ROC-AUC"))):
        for v, view in enumerate(views):
            rows = [probe[(probe["backbone"] == b) & (probe["task"] == t) & (probe["view"] == view)] for b, t in groups]
            means = np.array([r[f"{metric}_mean"].iloc[0] if len(r) else np.nan for r in rows])
            stds = np.array([r[f"{metric}_std"].fillna(0).iloc[0] if len(r) else 0.0 for r in rows])
            ax.bar(
                x + (v - (len(views) - 1) / 2) * width,
                means,
                width,
                yerr=stds,
                capsize=1.5,
                color=f"C{v}",
                label=VIEW_LABEL.get(view, view),
                error_kw={"lw": 0.8},
            )
        chance = probe["chance_balanced_accuracy"].max() if metric == "balanced_accuracy" else 0.5
        ax.axhline(chance, color="black", ls="--", lw=0.8, label="chance")
        ticks = []
        for b, t in groups:
            first = probe[(probe["backbone"] == b) & (probe["task"] == t)].iloc[0]
            images = _per_class(first["n_groups_per_class"]) or _per_class(first["n_per_class"])
            name = b if len(tasks) == 1 else f"{b}\n{t}"
            ticks.append(f"{name}\n{images} img")
        ax.set_xticks(x, ticks, fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"{label} (mean ± sd over folds)")
    axes[0][0].set_title("dataset probe: " + (tasks[0] if len(tasks) == 1 else "pairs and all"))
    axes[0][1].set_title("same probe, ranking quality")
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=len(names), bbox_to_anchor=(0.5, -0.02))
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return figure


def _paired_sets(training_sets: dict[str, list[str]], test_set: str) -> tuple[list[str], list[str]]:
    single = [name for name, members in training_sets.items() if list(members) == [test_set]]
    multi = [name for name, members in training_sets.items() if len(members) > 1 and test_set in members]
    return single, multi


def _difference_text(paired: pd.DataFrame | None, model: tuple, test_set: str, union: str, single: str, delta: float):
    """Δ with its paired 95 % interval (tables.paired_differences), or why there is none."""
    text = f"{delta:+.2f}"
    if paired is not None and len(paired):
        row = paired[
            (paired["backbone"] == model[0])
            & (paired["regime"] == model[1])
            & (paired["test_set"] == test_set)
            & (paired["train_set_a"] == union)
            & (paired["train_set_b"] == single)
        ]
        if "alignment" in paired.columns:
            row = row[row["alignment"] == "none"]
        if len(row):
            row = row.iloc[0]
            text = f"{row['fg_iou_diff']:+.2f}"
            if np.isfinite(row["fg_iou_diff_ci_low"]):
                text += f" [{row['fg_iou_diff_ci_low']:+.2f}, {row['fg_iou_diff_ci_high']:+.2f}]"
            elif isinstance(row.get("ci_note"), str) and row["ci_note"]:
                text += " (too few images)"
    return text.replace("-", "\u2212")


def paired_comparison(
    summary: pd.DataFrame,
    training_sets: dict[str, list[str]],
    metric: str = "fg_iou",
    paired: pd.DataFrame | None = None,
) -> plt.Figure:
    """Per source test set: the single-dataset model against the model trained on a union.

    One panel per test set that some multi-dataset training set contains; bars per backbone
    × regime (mean over seeds) with the sample sd over seeds and the 95 % bootstrap interval
    over test images side by side, and the difference union − single above, with the 95 %
    interval of that paired difference from ``paired`` (tables.paired_differences: the same
    test images resampled for both models) or "too few images" where there is none.
    """
    if "alignment" in summary.columns:
        summary = summary[summary["alignment"] == "none"]  # alignment has its own figure
    test_sets = [t for t in sorted(summary["test_set"].unique()) if all(_paired_sets(training_sets, t))]
    if not test_sets:
        raise ValueError("no test set has both a single-dataset and a multi-dataset training set")
    models = list(dict.fromkeys(zip(summary["backbone"], summary["regime"])))
    unions = list(dict.fromkeys(u for t in test_sets for u in _paired_sets(training_sets, t)[1]))
    figure, axes = plt.subplots(
        1,
        len(test_sets),
        squeeze=False,
        sharey=True,
        figsize=(min(MAX_WIDTH, 0.8 + len(test_sets) * (0.9 + 0.55 * len(models))), 2.6),
    )
    seeds = []
    for ax, test_set in zip(axes[0], test_sets):
        single, multi = _paired_sets(training_sets, test_set)
        shown = single[:1] + multi
        width = 0.8 / len(shown)
        panel = summary[summary["test_set"] == test_set]
        means = {}
        for k, train_set in enumerate(shown):
            rows = [
                panel[(panel["backbone"] == b) & (panel["regime"] == r) & (panel["train_set"] == train_set)]
                for b, r in models
            ]
            mean = np.array([row[f"{metric}_mean"].iloc[0] if len(row) else np.nan for row in rows])
            std = np.array([row[f"{metric}_std"].fillna(0).iloc[0] if len(row) else 0.0 for row in rows])
            seeds += [int(row[f"{metric}_n"].iloc[0]) for row in rows if len(row)]
            means[train_set] = mean
            colour = "C0" if k == 0 else f"C{1 + unions.index(train_set)}"  # same colour per role in every panel
            x = np.arange(len(models)) + (k - (len(shown) - 1) / 2) * width
            ax.bar(x, mean, width, color=colour)
            draw_intervals(ax, x, mean, std, image_interval(rows, list(mean), metric), width)
        for m in range(len(models)):
            deltas = {u: means[u][m] - means[shown[0]][m] for u in multi}
            text = "\n".join(
                _difference_text(paired if metric == "fg_iou" else None, models[m], test_set, u, shown[0], d)
                for u, d in deltas.items()
                if np.isfinite(d)
            )
            if text:
                ax.text(m, 1.01, text, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(np.arange(len(models)), [f"{b}\n{r}" for b, r in models], fontsize=6)
        ax.set_ylim(0, 1.0)
        ax.set_title(
            f"test set: {test_set}   (Δ = {' / '.join(multi)} − {shown[0]})", pad=12 + 7 * (len(multi) - 1), fontsize=7
        )
    over = over_what(summary)
    axes[0][0].set_ylabel(f"foreground IoU (mean over {over})" if metric == "fg_iou" else f"{metric} (mean)")
    n_text = (
        f"{min(seeds)}" if seeds and min(seeds) == max(seeds) else f"{min(seeds, default=0)}–{max(seeds, default=0)}"
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color="C0", label="trained on the test set's own dataset")]
    handles += [
        plt.Rectangle((0, 0), 1, 1, color=f"C{1 + k}", label=f"trained on {u} ({' + '.join(training_sets[u])})")
        for k, u in enumerate(unions)
    ]
    handles += interval_legend(over)
    figure.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 3),
        bbox_to_anchor=(0.5, 0.0),
        title=f"n = {n_text} {over} per bar; Δ [95 % paired interval]",
        title_fontsize=6,
    )
    figure.tight_layout(rect=(0, 0.2, 1, 1))
    return figure
