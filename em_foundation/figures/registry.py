"""Every figure of the workflow, by name: what it reads and which plotting function draws it.

One rule per figure passes the figure's name as a param to ``scripts/figure.py``; the
plotting functions (``plots``, ``analysis_plots``) take tables and return a Figure.
Inputs arrive as lists of paths by role: ``table`` (CSVs concatenated: one per backbone, or
summary.csv), ``counts`` (pca), ``prepared`` and ``predictions`` (qualitative).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from em_foundation.data.prepared import read_split
from em_foundation.figures import analysis_plots, plots
from em_foundation.io import open_h5

Inputs = dict[str, Sequence[str]]


def _table(paths: Sequence[str], every_size: bool = False) -> pd.DataFrame:
    """The tables concatenated; unless ``every_size``, only the models trained on all training
    slices (the label-efficiency sweep has a figure of its own)."""
    table = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    if not every_size and "n_train_slices" in table.columns:
        table = table[table["n_train_slices"].astype(str) == "all"]
    return table


def _pca(inputs: Inputs, params: dict[str, Any]) -> plt.Figure:
    counts = inputs.get("counts")
    return analysis_plots.pca_scatter(_table(inputs["table"]), _table(counts) if counts else None)


def _qualitative(inputs: Inputs, params: dict[str, Any]) -> plt.Figure:
    return plots.qualitative_panel(
        qualitative_examples(list(inputs["prepared"]), list(inputs["predictions"]), params["panels"])
    )


FIGURES: dict[str, Callable[[Inputs, dict[str, Any]], plt.Figure]] = {
    # Segmentation results (summary.csv, training_logs.csv, saved predictions).
    "iou_bars": lambda inputs, params: plots.iou_bars(
        _table(inputs["table"]), references=params.get("references", ()), in_domain=params.get("in_domain")
    ),
    "cross_domain": lambda inputs, params: plots.cross_domain_matrix(_table(inputs["table"])),
    "alignment": lambda inputs, params: plots.alignment_comparison(_table(inputs["table"])),
    "learning_curves": lambda inputs, params: plots.learning_curves(_table(inputs["table"])),
    "qualitative": _qualitative,
    "label_efficiency": lambda inputs, params: plots.label_efficiency(_table(inputs["table"], every_size=True)),
    # Domain analysis (the per-backbone CSVs of rule domain_analysis) and paired training.
    "pca": _pca,
    "frechet": lambda inputs, params: analysis_plots.frechet_matrix(_table(inputs["table"]), params.get("variant")),
    "probe": lambda inputs, params: analysis_plots.probe_accuracy(_table(inputs["table"])),
    "paired": lambda inputs, params: analysis_plots.paired_comparison(
        _table(inputs["table"]),
        params["training_sets"],
        paired=_table(inputs["paired"]) if "paired" in inputs else None,
    ),
}


def build_figure(name: str, inputs: Inputs, params: dict[str, Any] | None = None) -> plt.Figure:
    """Read the figure's inputs and draw it."""
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; choose one of {', '.join(FIGURES)}")
    return FIGURES[name](inputs, params or {})


def qualitative_examples(prepared: list[str], predictions: list[str], panels: list[dict]) -> list[dict]:
    """First saved test slice of each dataset with each chosen model's prediction."""
    examples: dict[str, dict] = {}
    for path, panel in zip(predictions, panels):
        test_set = panel["test_set"]
        if test_set not in examples:
            source = next(p for p in prepared if p.endswith(f"/{test_set}.h5"))
            truth = read_split(source, "test")
            examples[test_set] = {
                "dataset": test_set,
                "names": truth.names,
                "raw": truth.raw,
                "labels": truth.labels,
                "predictions": {},
            }
        with open_h5(path) as handle:
            if not len(handle):
                continue
            name = sorted(handle, key=examples[test_set]["names"].index)[0]
            examples[test_set]["slice"] = name
            examples[test_set]["predictions"][f"{panel['backbone']} {panel['regime']}"] = handle[name][()]
    result = []
    for example in examples.values():
        if "slice" not in example:
            continue
        index = example["names"].index(example["slice"])
        result.append(
            {
                "dataset": example["dataset"],
                "image": example["raw"][index],
                "truth": example["labels"][index],
                "predictions": example["predictions"],
            }
        )
    if not result:
        raise ValueError("no saved predictions to show; set evaluation.save_predictions >= 1")
    return result
