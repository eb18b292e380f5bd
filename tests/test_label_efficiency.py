"""The label-efficiency figure and the qualitative overlay: what they draw, from hand-made tables and masks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from em_foundation.figures import plots
from em_foundation.figures.registry import _table, build_figure


def sweep_summary() -> pd.DataFrame:
    rows = []
    for backbone, regime in (("filterbank", "head"), ("tinyvit", "lora")):
        for train_set in ("fibsem", "sstem"):
            for n, labelled in (("1", 1), ("2", 2), ("all", 9)):
                for test_set in ("fibsem", "sstem"):
                    mean = 0.2 + 0.05 * labelled
                    rows.append(
                        {
                            "backbone": backbone,
                            "regime": regime,
                            "train_set": train_set,
                            "alignment": "none",
                            "n_train_slices": n,
                            "n_labelled_slices": labelled,
                            "n_validation_slices": 17,  # the same at every size (Lucchi++'s 17)
                            "test_set": test_set,
                            "fg_iou_mean": mean,
                            "fg_iou_std": 0.02,
                            "fg_iou_ci_low": mean - 0.1,
                            "fg_iou_ci_high": mean + 0.1,
                            "in_domain": train_set == test_set,
                        }
                    )
    return pd.DataFrame(rows)


def test_label_efficiency_draws_a_line_per_model_and_training_set_on_a_log_axis():
    figure = plots.label_efficiency(sweep_summary())
    axes = [ax for ax in figure.axes if ax.get_title().startswith("test:")]
    assert [ax.get_title() for ax in axes] == ["test: fibsem", "test: sstem"]
    for ax in axes:
        assert ax.get_xscale() == "log"
        lines = [line for line in ax.get_lines() if line.get_label().startswith(("filterbank", "tinyvit"))]
        assert len(lines) == 2 * 2  # backbone × regime × training set
        # x counts every labelled slice a run uses: training ('all' as 9) plus the 17 validation slices
        assert all(list(line.get_xdata()) == [18, 19, 26] for line in lines)
        assert ax.get_xlabel() == "labelled slices used (training + validation)"
        dashed = {line.get_label() for line in lines if line.get_linestyle() == "--"}
        assert dashed == {
            f"{m} ({'sstem' if ax.get_title().endswith('fibsem') else 'fibsem'})"
            for m in ("filterbank head", "tinyvit lora")
        }
        assert len(ax.collections) == 2 * len(lines), "seed spread and image interval shaded for every line"


def test_label_efficiency_needs_a_sweep_and_other_figures_see_only_all_slices(tmp_path):
    single = sweep_summary()
    single = single[single["n_train_slices"] == "all"]
    with pytest.raises(ValueError, match="n_train_slices"):
        plots.label_efficiency(single)
    path = tmp_path / "summary.csv"
    sweep_summary().to_csv(path, index=False)
    assert set(_table([str(path)])["n_train_slices"].astype(str)) == {"all"}
    assert len(_table([str(path)], every_size=True)) == len(sweep_summary())
    assert build_figure("label_efficiency", {"table": [str(path)]}).axes


def test_overlay_colours_false_positives_and_misses_apart():
    image = np.full((10, 10), 0.5)
    truth, prediction = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    truth[2:5, 2:5] = 1
    prediction[3:5, 3:7] = 1  # overlaps the truth, spills right: false positives at columns 5-6
    figure = plots.qualitative_panel(
        [{"dataset": "d", "image": image, "truth": truth, "predictions": {"m head": prediction}}]
    )
    overlay = figure.axes[2 * 3 - 1]  # second row, third column
    colours = overlay.get_images()[1].get_array()
    red, blue = colours[..., 0] > 0.5, colours[..., 2] > 0.5
    assert np.array_equal(red, (prediction == 1) & (truth == 0))
    assert np.array_equal(blue & ~red, (truth == 1) & (prediction == 0))
    assert len(overlay.collections) == 1, "the prediction's contour is drawn"


def test_label_efficiency_refuses_tables_without_validation_slices():
    old = sweep_summary().drop(columns="n_validation_slices")
    with pytest.raises(ValueError, match="n_validation_slices"):
        plots.label_efficiency(old)
    unknown = sweep_summary().assign(n_validation_slices=-1)  # evaluated from a run.json that lacks it
    with pytest.raises(ValueError, match="rerun"):
        plots.label_efficiency(unknown)


def test_summary_carries_the_validation_slices_of_each_cell():
    from em_foundation.tables import summarise

    runs = pd.DataFrame(
        [
            {
                "backbone": "b",
                "regime": "head",
                "train_set": "t",
                "alignment": "none",
                "n_train_slices": n,
                "seed": seed,
                "test_set": "t",
                "in_domain": True,
                "transductive": False,
                "n_images": 2,
                "n_labelled_slices": labelled,
                "n_validation_slices": 17,
                **{m: 0.5 for m in ("fg_iou", "fg_dice", "mean_iou")},
            }
            for n, labelled in (("1", 1), ("all", 148))
            for seed in (0, 1)
        ]
    )
    summary = summarise(runs).set_index("n_train_slices")
    assert summary.loc["1", "n_validation_slices"] == 17 and summary.loc["all", "n_labelled_slices"] == 148
