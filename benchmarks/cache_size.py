"""Feature-cache size: measured on the benchmark tiles, extrapolated to the real datasets."""

from __future__ import annotations

from pathlib import Path

import h5py

from benchmarks.common import REAL_DATASETS, VIT_DIMS, Settings, Table
from em_foundation.data.tile_grid import TileGrid


def cache_bytes(n_tiles: int, n_images: int, embed_dim: int, side: int) -> int:
    """Bytes of the arrays cache_features writes: fp16 tokens + fp32 tile_pooled + fp32 pooled."""
    return n_tiles * embed_dim * side * side * 2 + n_tiles * embed_dim * 4 + n_images * embed_dim * 4


def bench_cache_size(settings: Settings, table: Table, label: str, cache: Path, embed_dim: int, patch: int) -> None:
    with h5py.File(cache, "r") as handle:
        n_tiles = int(handle["train"]["tokens"].shape[0])
        n_images = int(handle["train"]["pooled"].shape[0])
    side = settings.tile // patch
    size = cache.stat().st_size
    expected = cache_bytes(n_tiles, n_images, embed_dim, side)
    table.add(
        "cache_size",
        label,
        f"measured HDF5 file, {n_tiles} tiles of {settings.tile}px (C={embed_dim}, {side}x{side} grid)",
        size / 2**20,
        "MiB",
        1,
        f"{size / n_tiles / 2**20:.3f} MiB/tile",
    )
    table.add(
        "cache_size",
        label,
        "measured / array bytes (HDF5 overhead factor)",
        size / expected,
        "x",
        1,
        "extrapolations below use the array bytes",
    )


def bench_cache_extrapolation(settings: Settings, table: Table, patch: int = 14) -> None:
    side = settings.tile // patch
    for dataset, n_images, height, width in REAL_DATASETS:
        per_image = len(TileGrid.for_shape(height, width, settings.tile, settings.overlap).positions)
        n_tiles = n_images * per_image
        for name, dim in VIT_DIMS.items():
            size = cache_bytes(n_tiles, n_images, dim, side)
            table.add(
                "cache_size",
                f"{name}/{patch}",
                f"{dataset}: {n_images} slices {height}x{width} -> {n_tiles} tiles ({per_image}/slice), C={dim}",
                size / 2**30,
                "GiB",
                1,
                f"extrapolated, fp16 tokens, tile {settings.tile} overlap {settings.overlap}; train split is loaded into RAM by head training",
            )
