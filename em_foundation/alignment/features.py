"""Per-domain standardisation of cached patch tokens (see "Beyond the study" in docs/published-setup.md).

Each dataset ("domain") gets its own per-channel mean and standard deviation over all of
its patch tokens (every tile, every grid position), and its tokens are mapped to zero mean
and unit variance per channel. A head trained on the union of two datasets then sees both
in the same coordinates: first-order differences between domains (a shifted or rescaled
channel) are removed, what is left is the structure within each domain.

Where the statistics come from
------------------------------
* Training: each training dataset's own tiles (``standardise_by_source`` on the union,
  every tile by its own source's statistics). No labels are used.
* Test (evaluation.evaluate_model): by default the test dataset's unlabelled *train*
  split, so no statistic of the images being scored enters their prediction (inductive).
  The variant ``featstd-trans`` uses the test split's own tokens instead: transductive, the
  model is adapted to the test images, without their labels, before it is scored on them.
  ``domain_stats`` does not care which split it is given; the caller decides and records it.

Statistics are computed in float64 and streamed over chunks of tiles (Chan et al.'s
pairwise merge of counts, means and sums of squared deviations), so ~1000 tiles of
1024 × 32 × 32 float16 tokens (2 GB) never become an 8 GB float64 array, and an h5py
dataset can be passed directly without loading it.

Padding caveat: ``load_training_data`` pads token grids of different sizes with zeros
when it concatenates datasets (resize input mode only). Compute statistics on, and
standardise, each dataset *before* it is padded; a standardised array padded afterwards
keeps its padding at 0 (which after standardisation is the domain mean), whereas padding
first would count the zeros in the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_EPS = 1e-6
# Tiles per chunk when streaming: 8 tiles of 1024 × 32 × 32 are 64 MB in float64.
DEFAULT_CHUNK_TILES = 8


class RunningMoments:
    """Per-channel count, mean and sum of squared deviations, merged chunk by chunk in float64.

    Chan, Golub & LeVeque's pairwise update: merging (n_a, mean_a, M2_a) with
    (n_b, mean_b, M2_b) gives n = n_a + n_b, mean = mean_a + d n_b / n and
    M2 = M2_a + M2_b + d² n_a n_b / n with d = mean_b - mean_a. Unlike sums of squares it
    does not lose precision when the mean is large compared with the spread.
    """

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.asarray(m2, dtype=np.float64)
        if self.n == 0:
            self.n, self.mean, self.m2 = int(n), mean.copy(), m2.copy()
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def update(self, values: np.ndarray, channel_axis: int = 1) -> None:
        """Add an array whose ``channel_axis`` indexes the channels; all other axes are samples."""
        x = np.asarray(values, dtype=np.float64)
        axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
        n = int(np.prod([x.shape[a] for a in axes]))
        if n == 0:
            return
        mean = x.mean(axis=axes)
        shape = [1] * x.ndim
        shape[channel_axis % x.ndim] = -1
        deviations = x - mean.reshape(shape)
        self.merge(n, mean, np.square(deviations, out=deviations).sum(axis=axes))

    def variance(self, ddof: int = 0) -> np.ndarray:
        if self.n - ddof <= 0:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} samples, got {self.n}")
        return self.m2 / (self.n - ddof)


@dataclass
class DomainStats:
    """Per-channel mean and (population, ddof 0) standard deviation of one domain's tokens.

    ``scale`` = sqrt(std² + eps) is what ``standardise`` divides by, so that a constant
    (dead) channel maps to 0 instead of dividing by zero.
    """

    dataset: str
    mean: np.ndarray
    std: np.ndarray
    n_tokens: int
    eps: float = DEFAULT_EPS
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"mean {self.mean.shape} and std {self.std.shape} must be the same 1-D shape")

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def scale(self) -> np.ndarray:
        return np.sqrt(self.std**2 + self.eps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (floats as Python floats; float64 round-trips exactly through json)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "n_tokens": int(self.n_tokens),
            "eps": float(self.eps),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "DomainStats":
        return cls(
            dataset=payload["dataset"],
            mean=np.asarray(payload["mean"]),
            std=np.asarray(payload["std"]),
            n_tokens=int(payload["n_tokens"]),
            eps=float(payload.get("eps", DEFAULT_EPS)),
            split=payload.get("split"),
            extra=dict(payload.get("extra", {})),
        )


def _check_tokens(tokens: Any) -> tuple[int, int]:
    shape = tuple(tokens.shape)
    if len(shape) != 4:
        raise ValueError(f"tokens must be (n_tiles, C, h, w), got shape {shape}")
    return shape[0], shape[1]


def domain_stats(
    tokens: Any,
    eps: float = DEFAULT_EPS,
    dataset: str = "",
    *,
    split: str | None = None,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
) -> DomainStats:
    """Per-channel mean and std over every token of every tile, streamed in float64.

    ``tokens`` is (n_tiles, C, h, w), float16 or float32: a NumPy array or anything that
    slices like one along the first axis (an open h5py dataset is read chunk by chunk).
    """
    n_tiles, channels = _check_tokens(tokens)
    if n_tiles == 0:
        raise ValueError("no tiles to compute domain statistics from")
    moments = RunningMoments(channels)
    for start in range(0, n_tiles, max(1, chunk_tiles)):
        moments.update(np.asarray(tokens[start : start + chunk_tiles]), channel_axis=1)
    return DomainStats(
        dataset=dataset,
        mean=moments.mean,
        std=np.sqrt(moments.variance(ddof=0)),
        n_tokens=moments.n,
        eps=eps,
        split=split,
    )


def domain_stats_from_cache(
    path: str | Path, split: str, dataset: str = "", eps: float = DEFAULT_EPS, chunk_tiles: int = DEFAULT_CHUNK_TILES
) -> DomainStats:
    """``domain_stats`` of a feature cache's ``/<split>/tokens`` without loading it whole."""
    from em_foundation.feature_cache import CheckedTokens
    from em_foundation.io import open_h5

    with open_h5(path) as handle:
        return domain_stats(CheckedTokens(handle, split, path), eps, dataset, split=split, chunk_tiles=chunk_tiles)


def stats_by_source(
    tokens: np.ndarray, sources: np.ndarray, eps: float = DEFAULT_EPS, chunk_tiles: int = DEFAULT_CHUNK_TILES
) -> dict[str, DomainStats]:
    """One ``DomainStats`` per distinct source of a union array (tiles of each source only)."""
    sources = np.asarray(sources)
    if len(sources) != tokens.shape[0]:
        raise ValueError(f"{len(sources)} sources for {tokens.shape[0]} tiles")
    result = {}
    for source in np.unique(sources):
        index = np.flatnonzero(sources == source)
        result[str(source)] = domain_stats(_Rows(tokens, index), eps, str(source), chunk_tiles=chunk_tiles)
    return result


class _Rows:
    """A lazy row selection, so a source's tiles are gathered one chunk at a time."""

    def __init__(self, array: Any, index: np.ndarray) -> None:
        self.array, self.index = array, index
        self.shape = (len(index), *array.shape[1:])

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.array[self.index[item]])


def _standardise_into(
    out: np.ndarray, rows: np.ndarray | slice, tokens: Any, stats: DomainStats, chunk_tiles: int
) -> None:
    shape = (1, stats.channels, 1, 1)
    mean, scale = stats.mean.reshape(shape), stats.scale.reshape(shape)
    positions = np.arange(out.shape[0])[rows]
    for start in range(0, len(positions), max(1, chunk_tiles)):
        chunk = positions[start : start + chunk_tiles]
        source = tokens[chunk[0] : chunk[-1] + 1] if isinstance(rows, slice) else tokens[chunk]
        out[chunk] = (np.asarray(source, dtype=np.float64) - mean) / scale


def standardise(
    tokens: Any, stats: DomainStats, *, dtype: Any = np.float32, chunk_tiles: int = DEFAULT_CHUNK_TILES
) -> np.ndarray:
    """(tokens - mean) / sqrt(std² + eps) per channel, computed in float64, returned as ``dtype``.

    float32 by default; ``dtype=np.float16`` keeps the cache's memory footprint (the
    trainer turns tokens into float32 per batch anyway).
    """
    n_tiles, channels = _check_tokens(tokens)
    if channels != stats.channels:
        raise ValueError(f"tokens have {channels} channels, the statistics of {stats.dataset!r} {stats.channels}")
    out = np.empty(tuple(tokens.shape), dtype=dtype)
    _standardise_into(out, slice(None), tokens, stats, chunk_tiles)
    return out


def standardise_by_source(
    tokens: np.ndarray,
    sources: np.ndarray,
    stats: dict[str, DomainStats],
    *,
    dtype: Any = np.float32,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
) -> np.ndarray:
    """Standardise a union training set, every tile with its own source's statistics."""
    n_tiles, _ = _check_tokens(tokens)
    sources = np.asarray(sources)
    if len(sources) != n_tiles:
        raise ValueError(f"{len(sources)} sources for {n_tiles} tiles")
    missing = sorted(set(map(str, np.unique(sources))) - set(stats))
    if missing:
        raise KeyError(f"no domain statistics for sources {missing}")
    out = np.empty(tuple(tokens.shape), dtype=dtype)
    for source in np.unique(sources):
        rows = np.flatnonzero(sources == source)
        source_stats = stats[str(source)]
        if source_stats.channels != tokens.shape[1]:
            raise ValueError(
                f"statistics of {source!r} have {source_stats.channels} channels, tokens {tokens.shape[1]}"
            )
        _standardise_into(out, rows, tokens, source_stats, chunk_tiles)
    return out


class FeatureStandardiser(nn.Module):
    """(x - mean) / std per channel on (B, C, h, w) tokens, with mean and std as buffers.

    ``std`` is used as given; build it from ``DomainStats`` with ``from_stats`` (which
    passes ``stats.scale`` = sqrt(std² + eps)). The buffers are part of the state_dict, so
    a model that carries this module saves the statistics it was last given; for a
    cross-domain evaluation swap them to the test domain's with ``load_stats``.
    """

    def __init__(self, mean: torch.Tensor | np.ndarray, std: torch.Tensor | np.ndarray) -> None:
        super().__init__()
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(1, -1, 1, 1)
        std = torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(1, -1, 1, 1)
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} differ")
        if not bool(torch.all(std > 0)):
            raise ValueError("std must be positive (use from_stats, which adds eps)")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @classmethod
    def from_stats(cls, stats: DomainStats) -> "FeatureStandardiser":
        return cls(stats.mean, stats.scale)

    def load_stats(self, stats: DomainStats) -> None:
        if stats.channels != self.mean.shape[1]:
            raise ValueError(f"statistics have {stats.channels} channels, the module {self.mean.shape[1]}")
        self.mean.copy_(torch.as_tensor(stats.mean, dtype=self.mean.dtype).reshape(self.mean.shape))
        self.std.copy_(torch.as_tensor(stats.scale, dtype=self.std.dtype).reshape(self.std.shape))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.float() - self.mean) / self.std
