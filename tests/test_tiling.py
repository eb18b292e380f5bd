"""Tiling covers every pixel and stitching gives back the image exactly."""

import numpy as np
import pytest

from em_foundation.data.tile_grid import TileGrid, blend_window, extract_tiles, stitch_tiles, tile_starts


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(768, 1024, 448, 64), (1024, 1024, 448, 64), (256, 256, 224, 32), (300, 500, 112, 0), (100, 90, 112, 16)],
)
def test_tiling_then_stitching_gives_back_the_image(height, width, tile, overlap):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width)).astype(np.float64)
    grid = TileGrid.for_shape(height, width, tile, overlap)
    tiles = extract_tiles(image, grid)
    assert tiles.shape == (len(grid.positions), tile, tile)
    np.testing.assert_array_equal(stitch_tiles(tiles, grid, overlap), image)


def test_tiles_cover_every_pixel_and_stay_inside():
    grid = TileGrid.for_shape(768, 1024, 448, 64)
    covered = np.zeros((768, 1024), dtype=int)
    for y, x in grid.positions:
        assert 0 <= y <= 768 - 448 and 0 <= x <= 1024 - 448
        covered[y : y + 448, x : x + 448] += 1
    assert covered.min() >= 1


def test_starts_have_at_least_the_requested_overlap():
    starts = tile_starts(1024, 448, 64)
    assert starts[0] == 0 and starts[-1] == 1024 - 448
    assert all(b - a <= 448 - 64 for a, b in zip(starts, starts[1:]))


def test_stitching_channels_and_blending_weights():
    grid = TileGrid.for_shape(256, 256, 224, 32)
    probabilities = np.random.default_rng(1).random((2, 256, 256))
    tiles = np.stack([extract_tiles(channel, grid) for channel in probabilities], axis=1)
    np.testing.assert_allclose(stitch_tiles(tiles, grid, 32), probabilities)
    window = blend_window(224, 32)
    assert window.min() > 0 and window.max() == 1.0
