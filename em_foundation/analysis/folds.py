"""Cross-validation folds that respect serial sections: contiguous blocks, never shuffled.

Embeddings of a serial-section stack come in stack order, and neighbouring sections are
near-copies of each other. Shuffled folds put the neighbours of every held-out section into
training, so a probe or a threshold fitted there recognises the held-out ones as seen and
looks better than it is. Here each fold holds out one contiguous block of every class (of
whole groups, in the order they first appear, when groups such as a token's source image
are given), so only the sections at a block's two ends have a neighbour in training.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ContiguousFolds", "contiguous_folds"]


def contiguous_folds(
    n_splits: int, labels: np.ndarray | None = None, groups: np.ndarray | None = None, n: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: fold j tests the j-th of ``n_splits`` contiguous blocks of each class.

    ``labels`` (n,) stratifies (every class is cut into blocks of its own, so each fold holds
    every class); ``groups`` (n,) keeps a group (one image's tokens) in one block; rows are taken
    in their given order, which must be stack order. Without labels, one class of ``n`` rows.
    """
    if labels is None:
        if n is None:
            n = len(groups)
        labels = np.zeros(n, dtype=int)
    labels = np.asarray(labels)
    units = np.arange(len(labels)) if groups is None else np.asarray(groups)
    test_of = np.full(len(labels), -1)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = list(dict.fromkeys(units[members].tolist()))  # groups in order of first appearance
        if len(order) < n_splits:
            raise ValueError(f"class {label!s} has {len(order)} groups, fewer than {n_splits} folds")
        for fold, block in enumerate(np.array_split(np.arange(len(order)), n_splits)):
            chosen = set(order[i] for i in block)
            test_of[members[np.isin(units[members], list(chosen))]] = fold
    everything = np.arange(len(labels))
    return [(everything[test_of != fold], everything[test_of == fold]) for fold in range(n_splits)]


class ContiguousFolds:
    """A scikit-learn splitter over :func:`contiguous_folds` (stratified by ``y`` when given)."""

    def __init__(self, n_splits: int, stratify: bool = True):
        self.n_splits = int(n_splits)
        self.stratify = stratify

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits

    def split(self, X, y=None, groups=None):
        labels = np.asarray(y) if (self.stratify and y is not None) else None
        yield from contiguous_folds(self.n_splits, labels=labels, groups=groups, n=len(X))
