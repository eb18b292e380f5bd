"""Build each named figure from its inputs; the Snakemake rules only name the figure."""

from __future__ import annotations

from typing import Any

import pandas as pd

from em_foundation.data.prepared import read_split
from em_foundation.io import open_h5
from em_foundation.figures import plots


def build_figure(name: str, inputs: dict[str, Any], panels: list[dict] | None = None):
    if name == "iou_bars":
        return plots.iou_bars(pd.read_csv(inputs["table"]))
    if name == "cross_domain":
        return plots.cross_domain_matrix(pd.read_csv(inputs["table"]))
    if name == "alignment":
        return plots.alignment_comparison(pd.read_csv(inputs["table"]))
    if name == "learning_curves":
        return plots.learning_curves(pd.read_csv(inputs["table"]))
    if name == "qualitative":
        return plots.qualitative_panel(qualitative_examples(inputs["prepared"], inputs["predictions"], panels or []))
    raise KeyError(f"unknown figure {name!r}")


def qualitative_examples(prepared: list[str], predictions: list[str], panels: list[dict]) -> list[dict]:
    """First saved test slice of each dataset with each chosen model's prediction."""
    examples: dict[str, dict] = {}
    for path, panel in zip(predictions, panels):
        test_set = panel["test_set"]
        if test_set not in examples:
            source = next(p for p in prepared if p.endswith(f"/{test_set}.h5"))
            truth = read_split(source, "test")
            examples[test_set] = {"dataset": test_set, "names": truth.names, "raw": truth.raw, "labels": truth.labels, "predictions": {}}
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
        result.append({"dataset": example["dataset"], "image": example["raw"][index], "truth": example["labels"][index], "predictions": example["predictions"]})
    if not result:
        raise ValueError("no saved predictions to show; set evaluation.save_predictions >= 1")
    return result
