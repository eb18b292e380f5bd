"""Seeded validation splits, drawn per run seed and written down with the run."""

from __future__ import annotations

import math

import numpy as np


def validation_split(names: list[str], fraction: float, seed: int) -> dict[str, list[str]]:
    """Hold out ``fraction`` of the training slices (at least one) for early stopping.

    The permutation depends only on the seed and the slice names, not on file order, so
    the same seed always holds out the same slices.
    """
    if len(names) < 2:
        raise ValueError(f"need at least 2 training slices to hold one out, got {len(names)}")
    ordered = sorted(names)
    n_val = min(len(ordered) - 1, max(1, math.floor(fraction * len(ordered) + 0.5)))
    order = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted(ordered[i] for i in order[:n_val])
    train = [n for n in names if n not in set(val)]
    return {"seed": seed, "fraction": fraction, "train": train, "val": val}
