"""The tiles HDF5 file: every split of a prepared dataset cut into overlapping tiles.

    /<split>/raw          uint8 (n_tiles, T, T)
    /<split>/labels       uint8 (n_tiles, T, T)
    /<split>/image_index  int32 (n_tiles,)   which slice the tile came from
    /<split>/positions    int32 (n_tiles, 2) (y, x) of its top-left corner
    /<split>/names        str (n_images,)    slice names, as in the prepared file
    /<split>.attrs        height, width, tile, overlap

Positions are stored so that any per-tile prediction stitches back onto the native image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from em_foundation.data.prepared import read_split
from em_foundation.data.tiling import TileGrid, extract_tiles
from em_foundation.io import atomic_path


@dataclass
class TileSet:
    raw: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    positions: np.ndarray
    names: list[str]
    height: int
    width: int
    tile: int
    overlap: int

    @property
    def grid(self) -> TileGrid:
        return TileGrid.for_shape(self.height, self.width, self.tile, self.overlap)

    def tiles_of(self, image: int) -> np.ndarray:
        return np.flatnonzero(self.image_index == image)


def tile_dataset(prepared: str | Path, out: str | Path, tile: int, overlap: int) -> dict[str, int]:
    """Cut every split into tiles; returns the number of tiles per split."""
    counts = {}
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        with h5py.File(prepared, "r") as source:
            split_names = list(source)
        for split_name in split_names:
            split = read_split(prepared, split_name)
            height, width = split.raw.shape[1:]
            grid = TileGrid.for_shape(height, width, tile, overlap)
            raw = np.concatenate([extract_tiles(image, grid) for image in split.raw])
            labels = np.concatenate([extract_tiles(label, grid) for label in split.labels])
            n_per_image = len(grid.positions)
            group = handle.create_group(split_name)
            group.attrs.update({"height": height, "width": width, "tile": tile, "overlap": overlap})
            chunks = (1, tile, tile)
            group.create_dataset("raw", data=raw, chunks=chunks, compression="gzip", compression_opts=1)
            group.create_dataset("labels", data=labels, chunks=chunks, compression="gzip", compression_opts=1)
            group.create_dataset("image_index", data=np.repeat(np.arange(len(split), dtype=np.int32), n_per_image))
            group.create_dataset("positions", data=np.tile(np.array(grid.positions, dtype=np.int32), (len(split), 1)))
            group.create_dataset("names", data=np.array(split.names, dtype=object), dtype=h5py.string_dtype())
            counts[split_name] = len(raw)
    return counts


def read_tiles(path: str | Path, split: str, with_pixels: bool = True) -> TileSet:
    with h5py.File(path, "r") as handle:
        group = handle[split]
        attrs = dict(group.attrs)
        return TileSet(
            raw=group["raw"][()] if with_pixels else np.empty(0, np.uint8),
            labels=group["labels"][()],
            image_index=group["image_index"][()],
            positions=group["positions"][()],
            names=[n.decode() if isinstance(n, bytes) else str(n) for n in group["names"][()]],
            height=int(attrs["height"]),
            width=int(attrs["width"]),
            tile=int(attrs["tile"]),
            overlap=int(attrs["overlap"]),
        )
