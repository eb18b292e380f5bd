"""Batch order for one epoch: shuffled, or balanced across source datasets."""

from __future__ import annotations

import math

import numpy as np
import torch


def epoch_batches(sources: np.ndarray, batch_size: int, generator: torch.Generator, balanced: bool) -> list[np.ndarray]:
    """Indices of every batch of one epoch.

    Shuffled: a permutation of all tiles, cut into batches. Balanced: every batch draws
    the same number of tiles from each source dataset (cycling through each source's
    own permutation), so a 10:1 union does not drown the small dataset; the epoch has as
    many batches as the shuffled one.
    """
    n = len(sources)
    if not balanced:
        order = torch.randperm(n, generator=generator).numpy()
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    names = sorted(set(sources.tolist()))
    if batch_size % len(names):
        raise ValueError(
            f"balanced sampling needs training.batch_size ({batch_size}) to be a multiple of the "
            f"number of source datasets ({len(names)})"
        )
    per_source = batch_size // len(names)
    n_batches = math.ceil(n / batch_size)
    pools = {name: np.flatnonzero(sources == name) for name in names}
    streams = {}
    for name, pool in pools.items():
        needed = n_batches * per_source
        repeats = math.ceil(needed / len(pool))
        streams[name] = np.concatenate(
            [pool[torch.randperm(len(pool), generator=generator).numpy()] for _ in range(repeats)]
        )[:needed]
    return [
        np.concatenate([streams[name][b * per_source : (b + 1) * per_source] for name in names])
        for b in range(n_batches)
    ]
