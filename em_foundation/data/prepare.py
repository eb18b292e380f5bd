"""Prepare one dataset: convert its source, check it, write the HDF5 and its integrity report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from em_foundation.data import get_converter
from em_foundation.data.prepared import IGNORE_LABEL, write_prepared
from em_foundation.io import write_json


def prepare_dataset(
    name: str,
    spec: dict[str, Any],
    archive: Optional[Path],
    out_h5: Path,
    out_report: Path,
) -> dict[str, Any]:
    """Convert, check and write. Nothing is written unless every check passes."""
    splits, attrs = get_converter(spec["converter"])(archive, spec)
    report = {"dataset": name, "converter": spec["converter"], "splits": {}}
    for split_name, split in splits.items():
        labelled = split.labels != IGNORE_LABEL
        fractions = [
            float((labels[mask] == 1).mean()) if mask.any() else 0.0
            for labels, mask in zip(split.labels, labelled)
        ]
        report["splits"][split_name] = {
            "n_slices": len(split),
            "shape": list(split.raw.shape[1:]),
            "dtype": str(split.raw.dtype),
            "slices": [
                {"name": n, "source": s, "foreground_fraction": f}
                for n, s, f in zip(split.names, split.sources, fractions)
            ],
            "foreground_fraction_mean": float(np.mean(fractions)),
        }
    attrs = {"dataset": name, "converter": spec["converter"], **attrs}
    write_prepared(out_h5, splits, attrs)
    write_json(out_report, report)
    return report
