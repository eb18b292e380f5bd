"""Reference points (em_foundation/references.py): which runs they are, and the IoU figure's lines."""

from __future__ import annotations

import numpy as np
import pandas as pd

from em_foundation.config import validate_config
from em_foundation.figures import plots
from em_foundation.references import REFERENCES, in_domain_training_sets, reference_runs
from tests.test_config import demo_config


def test_reference_runs_are_the_configured_baselines_only():
    config = validate_config({**demo_config(), "regimes": ["head", "lora", "pixelforest"]})
    runs = reference_runs(config)
    assert [(r["backbone"], r["regime"]) for r in runs] == [("filterbank", "pixelforest")]
    assert runs[0]["label"].endswith(": filterbank")
    assert in_domain_training_sets(config) == {"fibsem": "fibsem", "sstem": "sstem"}
    without = validate_config({**demo_config(), "regimes": ["head", "lora"]})
    assert reference_runs(without) == []
    assert {reference.family for reference in REFERENCES} == {"filterbank", "unet"}


def _summary() -> pd.DataFrame:
    rows = []
    for test_set, offset in (("fibsem", 0.0), ("sstem", 0.1)):
        for backbone, regime, train_set, iou in (
            ("vit", "head", "fibsem", 0.5),
            ("vit", "head", "sstem", 0.3),
            ("filterbank", "pixelforest", "fibsem", 0.61),
            ("filterbank", "pixelforest", "sstem", 0.41),
        ):
            mean = iou + offset
            rows.append(
                dict(backbone=backbone, regime=regime, train_set=train_set, test_set=test_set, alignment="none",
                     fg_iou_mean=mean, fg_iou_std=0.01, fg_iou_ci_low=mean - 0.05, fg_iou_ci_high=mean + 0.05)
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_iou_figure_draws_each_reference_at_its_in_domain_score():
    reference = {"backbone": "filterbank", "regime": "pixelforest", "label": "pixel forest (filterbank)", "style": "--"}
    figure = plots.iou_bars(_summary(), references=[reference], in_domain={"fibsem": "fibsem", "sstem": "sstem"})
    panels = {ax.get_title(): ax for ax in figure.axes}
    for test_set, expected in (("fibsem", 0.61), ("sstem", 0.41 + 0.1)):
        lines = [line for line in panels[f"test set: {test_set}"].lines if line.get_label() == reference["label"]]
        assert len(lines) == 1, test_set
        assert np.allclose(lines[0].get_ydata(), expected), (test_set, lines[0].get_ydata())
    without = plots.iou_bars(_summary())
    assert not [line for ax in without.axes for line in ax.lines if line.get_label() == reference["label"]]
