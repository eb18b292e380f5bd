"""Domain analysis, its figures and the HTML report: plot builders on small tables, and a
tiny workflow run (one backbone, one seed, two epochs) from which the `figures` target must
redraw every figure without scheduling any upstream job, and `--report` must build."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import yaml

matplotlib.use("Agg")

from em_foundation.analysis import analyse_domains  # noqa: E402
from em_foundation.figures import analysis_plots as ap  # noqa: E402
from em_foundation.figures.registry import build_figure  # noqa: E402
from em_foundation.figures.style import save_figure, use_style  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("fibsem", "sstem")
TRAINING_SETS = {"fibsem": ["fibsem"], "sstem": ["sstem"], "paired": ["fibsem", "sstem"]}


# --------------------------------------------------------------------------- builders


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    """analyse_domains output for two backbones x two views, tagged as the rule writes it."""
    rng = np.random.default_rng(0)
    frames: dict[str, list[pd.DataFrame]] = {}
    for backbone, shift in (("far", 3.0), ("near", 0.0)):
        for view, per_image in (("pooled", 1), ("tokens", 4)):
            n = 10 * per_image
            embeddings = {"fibsem": rng.normal(size=(n, 6)), "sstem": rng.normal(size=(n, 6)) + shift}
            groups = {k: np.repeat(np.arange(10), per_image) for k in embeddings} if per_image > 1 else None
            result = analyse_domains(embeddings, n_boot=4, n_perm=4, pca_dim=3, groups=groups, n_splits=3)
            result.pop("notes")
            for name, frame in result.items():
                frames.setdefault(name, []).append(frame.assign(backbone=backbone, view=view))
    return {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}


def _summary(models=(("filterbank", "head"), ("tinyvit", "head"), ("tinyvit", "lora"))) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = [
        {
            "backbone": b,
            "regime": r,
            "train_set": train,
            "test_set": test,
            "fg_iou_mean": rng.uniform(0.2, 0.9),
            "fg_iou_std": rng.uniform(0, 0.1),
            "fg_iou_n": 2,
        }
        for b, r in models
        for train in TRAINING_SETS
        for test in DATASETS
    ]
    return pd.DataFrame(rows)


def _data_axes(figure) -> list:
    """Panels that hold data (not switched off, not a colour bar)."""
    return [ax for ax in figure.axes if ax.axison and ax.get_label() != "<colorbar>"]


def _width_ok(figure) -> None:
    assert figure.get_size_inches()[0] <= ap.MAX_WIDTH + 1e-9


def test_pca_scatter_one_panel_per_backbone_and_view(tables):
    figure = ap.pca_scatter(tables["pca"], tables["counts"])
    panels = _data_axes(figure)
    assert len(panels) == 4
    assert all(len(ax.collections) == 2 for ax in panels)  # one scatter per dataset
    assert all(re.match(r"PC1 \(\d+% var\.\)", ax.get_xlabel()) for ax in panels)
    token_titles = [ax.get_title() for ax in panels if "patch tokens" in ax.get_title()]
    assert token_titles and all("(10 + 10 img)" in t for t in token_titles)
    _width_ok(figure)


def test_pca_scatter_featstd_view_gets_its_own_row_and_label(tables):
    extra = tables["pca"][tables["pca"]["view"] == "pooled"].assign(view="pooled-featstd")
    figure = ap.pca_scatter(pd.concat([tables["pca"], extra], ignore_index=True))
    panels = _data_axes(figure)
    assert len(panels) == 6
    assert sum("standardised per dataset" in ax.get_title() for ax in panels) == 2


def test_pca_scatter_single_view(tables):
    figure = ap.pca_scatter(tables["pca"][tables["pca"]["view"] == "pooled"])
    assert len(_data_axes(figure)) == 2


def test_frechet_matrix_panels_annotations_and_colourbar(tables):
    figure = ap.frechet_matrix(tables["frechet"])
    panels = _data_axes(figure)
    assert len(panels) == 4
    assert sum(ax.get_label() == "<colorbar>" for ax in figure.axes) == 1
    for ax in panels:
        texts = [t.get_text() for t in ax.texts]
        assert sum("× null" in t for t in texts) == 2  # the pair, both triangles
        assert all("n=" in label.get_text() for label in ax.get_xticklabels())
    assert "ledoit-wolf" in figure._suptitle.get_text()
    far = (
        tables["frechet"].query("backbone == 'far' and view == 'pooled' and variant == 'ledoit_wolf'")["value"].iloc[0]
    )
    assert any(f"{far:.3g}" in t.get_text() for t in panels[0].texts)
    _width_ok(figure)


def test_frechet_matrix_variant_choice_and_no_null(tables):
    pca_variant = next(v for v in tables["frechet"]["variant"].unique() if v.startswith("pca"))
    figure = ap.frechet_matrix(tables["frechet"], variant=pca_variant)
    assert pca_variant in figure._suptitle.get_text()
    without_null = tables["frechet"].assign(null_q95=np.nan)
    figure = ap.frechet_matrix(without_null)
    assert not any("× null" in t.get_text() for ax in figure.axes for t in ax.texts)
    with pytest.raises(ValueError, match="not in the table"):
        ap.frechet_matrix(tables["frechet"], variant="nope")


def test_probe_accuracy_two_panels_chance_and_counts(tables):
    figure = ap.probe_accuracy(tables["probe"])
    panels = _data_axes(figure)
    assert len(panels) == 2
    for ax in panels:
        assert len(ax.patches) == 2 * 2  # backbones x views
        assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(0.5) for line in ax.lines)
        assert all("10 vs 10 img" in t.get_text() for t in ax.get_xticklabels())
    far = tables["probe"].query("backbone == 'far' and view == 'pooled'")["balanced_accuracy_mean"].iloc[0]
    assert far > 0.9
    _width_ok(figure)


def test_paired_comparison_one_panel_per_source_with_deltas():
    summary = _summary()
    figure = ap.paired_comparison(summary, TRAINING_SETS)
    panels = _data_axes(figure)
    assert [ax.get_title().split()[2] for ax in panels] == list(DATASETS)
    for ax, test in zip(panels, DATASETS):
        assert len(ax.patches) == 2 * 3  # (single, paired) x models
        cell = summary[
            (summary["backbone"] == "tinyvit") & (summary["regime"] == "lora") & (summary["test_set"] == test)
        ]
        delta = cell.set_index("train_set")["fg_iou_mean"]
        expected = f"{delta['paired'] - delta[test]:+.2f}".replace("-", "\u2212")
        assert expected in [t.get_text() for t in ax.texts]
    _width_ok(figure)
    with pytest.raises(ValueError, match="multi-dataset"):
        ap.paired_comparison(summary, {"fibsem": ["fibsem"], "sstem": ["sstem"]})


def test_iou_figures_show_seed_spread_and_image_interval_side_by_side():
    from matplotlib.collections import LineCollection

    from em_foundation.figures import plots

    summary = _summary().assign(alignment="none")
    summary["fg_iou_ci_low"] = summary["fg_iou_mean"] - 0.123
    summary["fg_iou_ci_high"] = summary["fg_iou_mean"] + 0.0456

    def error_segments(ax, grey):
        spans = []
        for collection in ax.collections:
            if isinstance(collection, LineCollection) and (np.allclose(collection.get_color()[0][:3], 0.45) == grey):
                spans += [round(float(seg[0][1] - seg[1][1]), 4) for seg in collection.get_segments()]
        return spans

    for figure in (plots.iou_bars(summary), ap.paired_comparison(summary, TRAINING_SETS)):
        ax = _data_axes(figure)[0]
        assert set(error_segments(ax, grey=True)) == {round(-0.123 - 0.0456, 4)}, "image interval drawn as given"
        assert error_segments(ax, grey=False) and set(error_segments(ax, grey=False)) != {round(-0.1686, 4)}
        legend = [
            t.get_text()
            for legend in [*figure.legends, *[a.get_legend() for a in figure.axes if a.get_legend()]]
            for t in legend.get_texts()
        ]
        assert "± sd over seeds" in legend and plots.INTERVAL_LABEL in legend
        assert "too few test images" in plots.INTERVAL_LABEL
    matrix = plots.cross_domain_matrix(summary)
    texts = [t.get_text() for ax in matrix.axes for t in ax.texts]
    row = summary.iloc[0]
    assert f"[{row.fg_iou_ci_low:.2f}, {row.fg_iou_ci_high:.2f}]" in "".join(texts) and "±" in "".join(texts)


def test_figure_registry_draws_analysis_figures_from_csvs_as_png_and_pdf(tables, tmp_path):
    use_style("paper")
    paths = {}
    for name in ("pca", "counts", "frechet", "probe"):
        paths[name] = []
        for backbone, frame in tables[name].groupby("backbone"):
            path = tmp_path / f"{backbone}_{name}.csv"
            frame.to_csv(path, index=False)
            paths[name].append(str(path))
    (tmp_path / "summary.csv").write_text(_summary().to_csv(index=False))
    inputs = {
        "pca": {"table": paths["pca"], "counts": paths["counts"]},
        "frechet": {"table": paths["frechet"]},
        "probe": {"table": paths["probe"]},
        "paired": {"table": [str(tmp_path / "summary.csv")]},
    }
    for name, figure_inputs in inputs.items():
        figure = build_figure(name, figure_inputs, {"training_sets": TRAINING_SETS})
        outputs = [tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"]
        save_figure(figure, outputs)
        assert all(p.stat().st_size > 1000 for p in outputs)
        width_in = matplotlib.image.imread(outputs[0]).shape[1] / matplotlib.rcParams["savefig.dpi"]
        assert width_in <= 7.0, f"{name}: {width_in:.2f} in wide on the page"
    with pytest.raises(KeyError, match="unknown figure 'nope'; choose one of iou_bars"):
        build_figure("nope", inputs["probe"])


# --------------------------------------------------------------------------- workflow


def _snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "2",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _dry_run_rules(result: subprocess.CompletedProcess) -> set[str]:
    """Rules of the jobs a dry-run lists."""
    text = result.stdout + result.stderr
    return set(re.findall(r"^(?:local)?rule (\w+):", text, flags=re.MULTILINE))


def _tiny_config() -> dict:
    """The demo, cut down: one backbone (filters, no weights), the head regime, one seed."""
    config = yaml.safe_load((REPO / "profiles/demo/workflow_config.yaml").read_text())
    for name in DATASETS:
        config["datasets"][name]["options"].update(n_train=6, n_test=2, height=128, width=128)
    config["backbones"] = {"filterbank": config["backbones"]["filterbank"]}
    config["regimes"] = ["head"]
    config["seeds"] = [0]
    config["training"].update(max_epochs=2, patience=1)
    config["evaluation"]["save_predictions"] = 1
    config["analysis"] = {
        "n_boot": 5,
        "n_perm": 5,
        "pca_dim": 8,
        "tokens_per_tile": 4,
        "max_tokens_per_dataset": 64,
        "umap": True,
    }
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain_workflow")
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(_tiny_config(), sort_keys=False))
    workdir = root / "work"
    started = time.perf_counter()
    _snakemake(workdir, configfile)
    print(f"tiny workflow: {time.perf_counter() - started:.0f} s")
    return workdir, configfile


@pytest.mark.slow
def test_domain_analysis_outputs_carry_counts(tiny_run):
    workdir, _ = tiny_run
    out = workdir / "results/analysis/filterbank"
    counts = pd.read_csv(out / "counts.csv")
    assert set(counts["view"]) == {"pooled", "tokens"}
    pooled = counts[counts["view"] == "pooled"].set_index("dataset")
    assert (pooled["n"] == 8).all()  # both splits: 6 train + 2 test images
    tokens = counts[counts["view"] == "tokens"].set_index("dataset")
    # Capped at 64 tokens per dataset by sampling fewer per tile: every image still in.
    assert (tokens["n_groups"] == 8).all() and (tokens["n"] <= 64).all() and (tokens["n"] >= 8).all()
    frechet = pd.read_csv(out / "frechet.csv")
    assert set(frechet["variant"]) == {"full", "ledoit_wolf", "pca8"}
    assert frechet[["n_a", "n_b", "n_boot", "n_perm"]].notna().all().all()
    assert len(pd.read_csv(out / "probe.csv")) == 2 and len(pd.read_csv(out / "ood.csv")) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"] == "filterbank" and summary["datasets"] == list(DATASETS)
    assert any("max_tokens_per_dataset 64" in note for note in summary["notes"])
    if summary["umap"] == "skipped":
        assert any("umap" in note.lower() for note in summary["notes"])
        assert pd.read_csv(out / "umap.csv").empty


@pytest.mark.slow
def test_figures_target_redraws_from_tables_only(tiny_run):
    workdir, configfile = tiny_run
    figures = sorted((workdir / "results/figures").glob("*.png"))
    names = {p.stem for p in figures}
    assert {"pca", "frechet", "probe", "paired", "iou_bars", "cross_domain", "qualitative", "learning_curves"} <= names
    for path in (workdir / "results/figures").iterdir():
        path.unlink()
    rules = _dry_run_rules(_snakemake(workdir, configfile, "figures", "-n"))
    assert rules and all(rule.startswith("figure_") or rule == "figures" for rule in rules), rules
    started = time.perf_counter()
    _snakemake(workdir, configfile, "figures")
    seconds = time.perf_counter() - started
    print(f"figures target: {seconds:.0f} s for {len(rules) - 1} figures")
    assert {p.stem for p in (workdir / "results/figures").glob("*.png")} == names
    assert {p.stem for p in (workdir / "results/figures").glob("*.pdf")} == names


@pytest.mark.slow
def test_report_builds_with_figures_and_tables(tiny_run):
    workdir, configfile = tiny_run
    _snakemake(workdir, configfile, "figures")  # in case the previous test left them missing
    report = workdir / "report.html"
    _snakemake(workdir, configfile, "--report", str(report))
    text = report.read_text()
    assert report.stat().st_size > 100_000
    for name in (
        "pca.png",
        "frechet.png",
        "probe.png",
        "paired.png",
        "iou_bars.png",
        "summary.html",
        "fibsem.html",
        "filterbank.html",
    ):
        assert name in text, name
    for category in ("Figures", "Tables", "Datasets", "Domain analysis"):
        assert category in text, category
    page = (workdir / "results/report/summary.html").read_text()
    assert "Foreground IoU per test set" in page and "±" in page


def test_paired_comparison_prints_the_paired_interval_or_why_there_is_none():
    summary = _summary()
    cell = summary[(summary["backbone"] == "tinyvit") & (summary["regime"] == "lora")].set_index(
        ["test_set", "train_set"]
    )["fg_iou_mean"]
    rows = []
    for k, test in enumerate(DATASETS):
        delta = cell[(test, "paired")] - cell[(test, test)]
        low, high = (delta - 0.031, delta + 0.042) if k == 0 else (np.nan, np.nan)
        rows.append(
            {
                "backbone": "tinyvit",
                "regime": "lora",
                "alignment": "none",
                "test_set": test,
                "train_set_a": "paired",
                "train_set_b": test,
                "fg_iou_diff": delta,
                "fg_iou_diff_ci_low": low,
                "fg_iou_diff_ci_high": high,
                "ci_note": "" if k == 0 else "too few test images (3 < 10)",
            }
        )
    figure = ap.paired_comparison(summary, TRAINING_SETS, paired=pd.DataFrame(rows))
    texts = {test: [t.get_text() for t in ax.texts] for test, ax in zip(DATASETS, _data_axes(figure))}
    first = rows[0]
    expected = f"{first['fg_iou_diff']:+.2f} [{first['fg_iou_diff_ci_low']:+.2f}, {first['fg_iou_diff_ci_high']:+.2f}]"
    assert expected.replace("-", "\u2212") in texts[DATASETS[0]]
    assert any(t.endswith("(too few images)") for t in texts[DATASETS[1]])
    legend_titles = [legend.get_title().get_text() for legend in figure.legends]
    assert any("paired interval" in title for title in legend_titles)


def test_labels_say_seeds_times_folds_where_folds_are_pooled():
    from em_foundation.figures import plots

    summary = _summary().assign(alignment="none", n_over="seeds × folds")
    figure = plots.iou_bars(summary)
    assert "seeds × folds" in _data_axes(figure)[0].get_ylabel()
    legend = [t.get_text() for a in figure.axes if a.get_legend() for t in a.get_legend().get_texts()]
    assert "± sd over seeds × folds" in legend
