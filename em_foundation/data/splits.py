"""Splits of a stack's sections: seeded shuffle (published), one contiguous block, or k folds.

Sections of a serial-section stack (VNC) are near-identical to their neighbours, so a
shuffled split puts the neighbours of every test section into training and flatters the
score. ``contiguous`` tests one block of consecutive sections and leaves ``gap`` sections
on each side of it out of training altogether; ``kfold`` cuts the stack into k contiguous
blocks, each tested once across the folds, with the same gap. The same three rules choose
the validation slices inside a training volume (``validation_split``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SPLIT_MODES = ("shuffle", "contiguous", "kfold")


def section_order(names: Sequence[str]) -> list[str]:
    """Names in stack order: numerically when every name is a number, else as text."""
    names = [str(n) for n in names]
    return sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else sorted(names)


def held_out_block(
    names: Sequence[str],
    n_held: int,
    mode: str,
    seed: int = 0,
    gap: int = 0,
    n_folds: int = 5,
    fold: int = 0,
    start: int | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """(kept, held out, dropped) section names, each in stack order.

    shuffle: the first ``n_held`` of ``default_rng(seed).permutation(stack order)``;
    contiguous: ``n_held`` consecutive sections starting at ``start`` (None: the last ones);
    kfold: block ``fold`` of ``n_folds`` contiguous blocks (``numpy.array_split``; ``n_held``
    ignored). ``gap`` sections on each side of a contiguous block or fold are dropped: neither
    kept nor held out.
    """
    ordered = section_order(names)
    n = len(ordered)
    if mode not in SPLIT_MODES:
        raise ValueError(f"split {mode!r} is not one of {', '.join(SPLIT_MODES)}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if mode == "shuffle":
        order = np.random.default_rng(seed).permutation(n)
        held = {ordered[i] for i in order[:n_held]}
        return [s for s in ordered if s not in held], [s for s in ordered if s in held], []
    if mode == "kfold":
        if not 2 <= n_folds <= n or not 0 <= fold < n_folds:
            raise ValueError(
                f"kfold needs 2 <= n_folds <= {n} sections and 0 <= fold < n_folds, got n_folds={n_folds}, fold={fold}"
            )
        blocks = np.array_split(np.arange(n), n_folds)
        first, last = int(blocks[fold][0]), int(blocks[fold][-1]) + 1
    else:
        first = n - n_held if start is None else int(start)
        last = first + n_held
        if not 0 <= first < last <= n:
            raise ValueError(f"a contiguous block of {n_held} sections from index {first} does not fit {n} sections")
    held = ordered[first:last]
    dropped = ordered[max(0, first - gap) : first] + ordered[last : last + gap]
    kept = [s for s in ordered if s not in set(held) | set(dropped)]
    if not kept:
        raise ValueError(f"nothing left to train on: {n} sections, {len(held)} held out, gap {gap} on each side")
    return kept, held, dropped


def validation_split(
    names: list[str], fraction: float, seed: int, mode: str = "shuffle", gap: int = 0
) -> dict[str, list[str]]:
    """Hold out ``fraction`` of the training slices (at least one) for early stopping.

    shuffle (published): a seeded permutation that depends only on the seed and the slice
    names, not on file order, so the same seed always holds out the same slices.
    contiguous: one block of consecutive slices, its position drawn from the seed, with
    ``gap`` slices on each side dropped from training (listed under ``dropped``).
    """
    if len(names) < 2:
        raise ValueError(f"need at least 2 training slices to hold one out, got {len(names)}")
    if mode not in ("shuffle", "contiguous"):
        raise ValueError(f"training.val_split {mode!r} is not one of shuffle, contiguous")
    n_val = min(len(names) - 1, max(1, math.floor(fraction * len(names) + 0.5)))
    if mode == "shuffle":
        ordered = sorted(names)
        order = np.random.default_rng(seed).permutation(len(ordered))
        val = sorted(ordered[i] for i in order[:n_val])
        dropped: list[str] = []
    else:
        start = int(np.random.default_rng(seed).integers(0, len(names) - n_val + 1))
        _, val, dropped = held_out_block(names, n_val, "contiguous", gap=gap, start=start)
    train = [n for n in names if n not in set(val) | set(dropped)]
    if not train:
        raise ValueError(f"no training slices left: {len(names)} slices, {n_val} for validation, gap {gap}")
    return {
        "seed": seed,
        "fraction": fraction,
        "mode": mode,
        "gap": gap,
        "train": train,
        "val": val,
        "dropped": dropped,
    }


VALIDATION_MODES = ("auto", "shuffle", "contiguous")


def validation_mode(val_split: str, val_gap: int | None, test_split: dict | None) -> tuple[str, int, str]:
    """(mode, gap, why) of the validation split inside a training volume.

    ``auto`` (the default) follows the dataset's test split (its ``options.split`` and
    ``options.gap``): a contiguous or k-fold test block means serial sections matter, so the
    validation slices are one contiguous block with the same gap, else those near-copies of
    validation slices would train the model that early stopping judges; a shuffled test split
    or a separate test volume keeps the published shuffle. ``val_gap`` set overrides the gap.
    """
    if val_split not in VALIDATION_MODES:
        raise ValueError(f"training.val_split {val_split!r} is not one of {', '.join(VALIDATION_MODES)}")
    if val_split != "auto":
        return val_split, int(val_gap or 0), f"training.val_split: {val_split}"
    test_mode = (test_split or {}).get("split") or "shuffle"
    if test_mode in ("contiguous", "kfold"):
        gap = int((test_split or {}).get("gap") or 0) if val_gap is None else int(val_gap)
        return "contiguous", gap, f"auto: follows the test split ({test_mode}, gap {gap})"
    return "shuffle", int(val_gap or 0), f"auto: follows the test split ({test_mode} or a separate test volume)"


# A stream of its own, so that the labelled subset is not the validation shuffle's continuation.
_LABELLED_STREAM = 19


def labelled_subset(train: Sequence[str], n_train_slices: int | str, seed: int) -> list[str]:
    """The ``n_train_slices`` labelled slices of a label-efficiency run (or all: ``'all'``), in ``train``'s order.

    ``train`` is the training split left after the validation slices (and their gap) are set
    aside, so validation slices never enter. The subset is the first n of a permutation seeded
    by ``seed`` alone over the names in stack order, so the sizes are nested (the 2-slice set
    contains the 1-slice set), the same seed always draws the same slices and different seeds
    differ. A size above the number of training slices takes them all.
    """
    if str(n_train_slices) == "all":
        return list(train)
    n = int(n_train_slices)
    if n < 1:
        raise ValueError(f"training.n_train_slices must be >= 1 or 'all', got {n_train_slices!r}")
    ordered = section_order(train)
    order = np.random.default_rng([seed, _LABELLED_STREAM]).permutation(len(ordered))
    chosen = {ordered[i] for i in order[:n]}
    return [name for name in train if str(name) in chosen]
