"""Two-dimensional views of embeddings (PCA, optionally UMAP) for the domain scatter plots.

These are pictures, not tests: the numbers that decide whether there is a domain gap come
from frechet, probe and ood. PCA is linear and deterministic, so its axes and explained
variance can be quoted; UMAP is optional (umap-learn is not a dependency) and only drawn.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["pca_2d", "umap_2d"]

log = logging.getLogger(__name__)


def pca_2d(features: np.ndarray, labels: np.ndarray, balance: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Project features (n, d) on their first two principal components.

    Returns coordinates (n, 2) and the explained-variance ratios (2,) of those components
    relative to the total variance of the (possibly weighted) data, so they sum to <= 1.
    With ``balance=True`` every dataset in ``labels`` gets equal total weight in the fit,
    so that 330 Lucchi++ images do not define the axes alone and hide 20 VNC images'
    directions; the default (False) is the plain pooled PCA the study drew. Signs of the
    axes are fixed (largest-magnitude loading positive) so that plots are reproducible.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"expected features (n, d) and labels (n,), got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("PCA needs at least 2 samples")
    if balance:
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        w = 1.0 / (len(classes) * counts[inverse])
    else:
        w = np.full(len(x), 1.0 / len(x))
    centre = w @ x
    centred = x - centre
    _, s, vt = np.linalg.svd(centred * np.sqrt(w)[:, None], full_matrices=False)
    k = min(2, vt.shape[0])
    axes = vt[:k]
    flip = np.sign(axes[np.arange(k), np.argmax(np.abs(axes), axis=1)])
    axes = axes * np.where(flip == 0, 1.0, flip)[:, None]
    total = float(np.sum(s**2))
    evr = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    coords = centred @ axes.T
    if k < 2:  # d == 1: pad with a zero axis so callers always get (n, 2)
        coords = np.pad(coords, ((0, 0), (0, 2 - k)))
        evr = np.pad(evr, (0, 2 - k))
    return coords, evr


def umap_2d(features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray | None:
    """UMAP coordinates (n, 2), or None with a logged note when umap-learn is not installed.

    umap-learn is imported here, not at module import, so that the rest of the analysis
    runs without it. ``n_neighbors`` is capped at n - 1 for small datasets.
    """
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        log.warning("umap-learn is not installed; skipping the UMAP embedding")
        return None
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 3:
        raise ValueError("UMAP needs at least 3 samples")
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=int(min(n_neighbors, len(x) - 1)),
        min_dist=min_dist,
        random_state=seed,
    )
    return np.asarray(reducer.fit_transform(x))
