"""Mahalanobis out-of-distribution scores: how many of one dataset's embeddings look foreign
to a Gaussian fitted on another's?

A head trained on dataset A sees features from A; the fraction of dataset B's embeddings
beyond A's 97th-percentile Mahalanobis distance is a direct, interpretable size of the shift.
The covariance is Ledoit-Wolf, because the reference often has fewer images than feature
dimensions (20 VNC slices in 1024 dimensions) and a sample covariance would be singular.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["mahalanobis_ood", "fit_ledoit_wolf", "mahalanobis_scores"]


def fit_ledoit_wolf(reference: np.ndarray):
    """Ledoit-Wolf Gaussian (location and shrunk covariance) of the reference samples."""
    from sklearn.covariance import LedoitWolf

    return LedoitWolf(assume_centered=False).fit(np.asarray(reference, dtype=np.float64))


def mahalanobis_scores(model, x: np.ndarray) -> np.ndarray:
    """Mahalanobis distances (not squared) of rows of x under a fitted sklearn covariance."""
    return np.sqrt(np.clip(model.mahalanobis(np.asarray(x, dtype=np.float64)), 0.0, None))


def _oof_reference_scores(reference: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> np.ndarray:
    """Each reference sample scored by a model fitted without it (contiguous folds, grouped if asked).

    In-sample distances are optimistic (a point pulls the fitted mean and covariance towards
    itself, strongly so when n is close to d), so a threshold from them flags too many new
    in-distribution samples. Out-of-fold scores behave like those of unseen samples.
    """
    from .folds import ContiguousFolds

    n = len(reference)
    units = n if groups is None else len(np.unique(groups))
    k = int(min(n_splits, units))
    if k < 2:
        raise ValueError("out-of-fold reference scores need at least 2 samples (or groups)")
    cv = ContiguousFolds(k)  # contiguous blocks of the series: near-copy neighbours stay on one side
    scores = np.empty(n, dtype=np.float64)
    for train, test in cv.split(reference, groups=groups):
        if len(train) < 2:
            raise ValueError("a training fold has fewer than 2 reference samples")
        scores[test] = mahalanobis_scores(fit_ledoit_wolf(reference[train]), reference[test])
    return scores


def mahalanobis_ood(
    reference: np.ndarray,
    query: np.ndarray,
    percentile: float = 97.0,
    n_splits: int = 5,
    seed: int = 0,
    reference_groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Flag query samples beyond the reference's own ``percentile`` Mahalanobis distance.

    The threshold is the percentile of *out-of-fold* reference scores (``n_splits``-fold;
    ``n_splits=0`` falls back to leave-in scores, which are optimistic). Query samples are
    scored under the Ledoit-Wolf Gaussian fitted on the whole reference. New
    in-distribution samples are then flagged at about (100 - percentile) %, up to the
    error of an empirical quantile from n reference scores (with n = 20 the 97th percentile
    sits between the two largest scores, so expect about 5 %); leave-in thresholds flag
    several times the nominal rate when n is close to d, which the tests check.
    ``reference_groups`` keeps correlated samples (tokens of one image) in one fold; folds are
    contiguous blocks of the reference in its given (stack) order, so a section's near-copy
    neighbours do not make its out-of-fold score look in-sample (analysis/folds.py).
    """
    ref = np.asarray(reference, dtype=np.float64)
    qry = np.asarray(query, dtype=np.float64)
    if ref.ndim != 2 or qry.ndim != 2 or ref.shape[1] != qry.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) arrays, got {ref.shape} and {qry.shape}")
    if len(ref) < 3:
        raise ValueError(f"need at least 3 reference samples, got {len(ref)}")
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
    groups = None if reference_groups is None else np.asarray(reference_groups)
    if groups is not None and groups.shape != (len(ref),):
        raise ValueError(f"reference_groups must have shape ({len(ref)},), got {groups.shape}")

    full = fit_ledoit_wolf(ref)
    in_sample = mahalanobis_scores(full, ref)
    ref_scores = in_sample if n_splits == 0 else _oof_reference_scores(ref, groups, n_splits, seed)
    threshold = float(np.percentile(ref_scores, percentile))
    query_scores = mahalanobis_scores(full, qry)
    flagged = query_scores > threshold
    return {
        "threshold": threshold,
        "percentile": float(percentile),
        "reference_scores": ref_scores,
        "query_scores": query_scores,
        "fraction_flagged": float(flagged.mean()) if len(qry) else float("nan"),
        "n_flagged": int(flagged.sum()),
        "reference_fraction_flagged": float(np.mean(ref_scores > threshold)),
        "threshold_in_sample": float(np.percentile(in_sample, percentile)),
        "out_of_fold": bool(n_splits != 0),
        "shrinkage": float(full.shrinkage_),
        "n_reference": int(len(ref)),
        "n_query": int(len(qry)),
    }
