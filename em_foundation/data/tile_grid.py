"""Native-resolution tiling with overlap, and stitching back to the full image.

Tiles cover every pixel; the last tile along each axis is shifted to end on the border
rather than padded, so no prediction is made on invented pixels. Only images smaller
than a tile are padded (by reflection) and the padding is cropped on stitching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride tile - overlap, last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie: (y, x) of each tile's top-left corner."""

    height: int
    width: int
    tile: int
    positions: tuple[tuple[int, int], ...]

    @classmethod
    def for_shape(cls, height: int, width: int, tile: int, overlap: int) -> "TileGrid":
        positions = tuple((y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap))
        return cls(height, width, tile, positions)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return max(self.height, self.tile), max(self.width, self.tile)


def extract_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(H, W[, ...]) image to (n_tiles, tile, tile[, ...]) tiles."""
    pad_h = grid.padded_shape[0] - grid.height
    pad_w = grid.padded_shape[1] - grid.width
    if pad_h or pad_w:
        pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pad, mode="reflect" if min(grid.height, grid.width) > 1 else "edge")
    t = grid.tile
    return np.stack([image[y : y + t, x : x + t] for y, x in grid.positions])


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Weights that fall off linearly over the overlap, so seams average smoothly."""
    if overlap <= 0:
        return np.ones((tile, tile), dtype=np.float32)
    ramp = np.minimum(np.arange(tile) + 1, np.arange(tile)[::-1] + 1).astype(np.float32)
    ramp = np.clip(ramp / (overlap + 1), 0.0, 1.0)
    return np.outer(ramp, ramp)


def stitch_tiles(tiles: np.ndarray, grid: TileGrid, overlap: int = 0) -> np.ndarray:
    """Weighted average of overlapping (n_tiles, [C,] tile, tile) tiles into ([C,] H, W).

    With identical values in the overlaps (e.g. the image itself) the result equals the
    original exactly, whatever the weights.
    """
    window = blend_window(grid.tile, overlap)
    channels = tiles.shape[1:-2]
    out = np.zeros(channels + grid.padded_shape, dtype=np.float64)
    weight = np.zeros(grid.padded_shape, dtype=np.float64)
    t = grid.tile
    for tile_values, (y, x) in zip(tiles, grid.positions):
        out[..., y : y + t, x : x + t] += tile_values * window
        weight[y : y + t, x : x + t] += window
    out /= weight
    return out[..., : grid.height, : grid.width]
