"""The tiles HDF5 file: every split of a prepared dataset cut into the inputs a backbone sees.

    /<split>/raw          uint8 (n_tiles, h, w)
    /<split>/labels       uint8 (n_tiles, h, w)
    /<split>/image_index  int32 (n_tiles,)   which slice the tile came from
    /<split>/positions    int32 (n_tiles, 2) (y, x) of its top-left corner on the slice
    /<split>/names        str (n_images,)    slice names, as in the prepared file
    /<split>.attrs        mode, height, width (native), tile, overlap, tile_height, tile_width

Two modes. ``tile``: square tiles at native resolution with overlap; positions let any
per-tile prediction stitch back onto the slice. ``resize`` (the published input mode):
one input per slice, resized so the longest edge is ``longest_edge`` with each side
floored to a multiple of the patch size (bicubic for images, nearest for masks);
predictions are resized back to the native grid before scoring.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from em_foundation.config import check_tile_fits
from em_foundation.data.prepared import pixel_size_of, read_split
from em_foundation.data.tile_grid import TileGrid, extract_tiles, stitch_tiles
from em_foundation.io import atomic_path, create_dataset, decode, file_sha256, open_h5


def resized_shape(height: int, width: int, longest_edge: int, patch_size: int) -> tuple[int, int]:
    """Scale so the longest side is ``longest_edge``, then floor each side to the patch size."""
    scale = longest_edge / max(height, width)
    return (
        max(patch_size, int(height * scale) // patch_size * patch_size),
        max(patch_size, int(width * scale) // patch_size * patch_size),
    )


def resize_images(images: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    """(N, H, W) uint8 to (N, h, w): bicubic (clamped) for images, nearest for label maps."""
    tensor = torch.from_numpy(images).unsqueeze(1).float()
    if mode == "nearest":
        out = F.interpolate(tensor, size=shape, mode="nearest-exact")
    else:
        out = F.interpolate(tensor, size=shape, mode="bicubic", align_corners=False).round().clamp(0, 255)
    return out.squeeze(1).to(torch.uint8).numpy()


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
    mode: str = "tile"
    # The grid the tiles were cut from when the slices were resampled to another pixel size
    # (tiling.pixel_size_nm); None: the native grid.
    grid_height: int | None = None
    grid_width: int | None = None

    @property
    def grid(self) -> TileGrid:
        return TileGrid.for_shape(
            self.grid_height or self.height, self.grid_width or self.width, self.tile, self.overlap
        )

    @property
    def tile_shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape[-2:])

    def tiles_of(self, image: int) -> np.ndarray:
        return np.flatnonzero(self.image_index == image)

    def to_native(self, tile_values: np.ndarray) -> np.ndarray:
        """One slice's per-tile maps ([n_tiles,] [C,] h, w) back onto its native (H, W) grid."""
        if self.mode == "resize":
            tensor = torch.from_numpy(np.asarray(tile_values, dtype=np.float32)).reshape(1, -1, *self.tile_shape)
            native = F.interpolate(tensor, size=(self.height, self.width), mode="bilinear", align_corners=False)
            return native.reshape(*np.shape(tile_values)[1:-2], self.height, self.width).numpy()
        stitched = stitch_tiles(tile_values, self.grid, self.overlap)
        if stitched.shape[-2:] == (self.height, self.width):
            return stitched
        # resampled tiles: the stitched map goes back to the native grid, where evaluation happens
        tensor = torch.from_numpy(np.asarray(stitched, dtype=np.float32)).reshape(1, -1, *stitched.shape[-2:])
        native = F.interpolate(tensor, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return native.reshape(*stitched.shape[:-2], self.height, self.width).numpy()


def resample_split(
    raw: np.ndarray, labels: np.ndarray, native_nm: tuple[float, float], target_nm: float
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Slices resampled from their native pixel size to ``target_nm`` (bicubic images, nearest labels).

    A VFM sees an organelle at a size in pixels that depends on the pixel size; a common
    pixel size makes datasets imaged at different resolutions look alike in that respect.
    """
    height, width = raw.shape[1:]
    shape = (max(1, round(height * native_nm[0] / target_nm)), max(1, round(width * native_nm[1] / target_nm)))
    return resize_images(raw, shape, "bicubic"), resize_images(labels, shape, "nearest"), shape


def intensity_table(
    source: np.ndarray, intensity: str, reference: str | Path | None, percentiles: tuple[float, float]
) -> np.ndarray | None:
    """The 256-entry grey-level map of a per-domain intensity normalisation, fitted on ``source``.

    percentile: ``source``'s pooled percentiles stretched to 0-255; histmatch: ``source``'s
    pooled histogram matched to the reference dataset's training slices. Images only, never
    labels. None for raw.
    """
    from em_foundation.alignment import (
        histogram_matching_table,
        intensity_bounds,
        percentile_normalise,
        reference_quantiles,
    )

    kind = intensity.removesuffix("-trans")
    if kind == "raw":
        return None
    if kind == "percentile":
        levels = np.arange(256, dtype=np.uint8)
        return percentile_normalise(levels, bounds=intensity_bounds(source, percentiles[0], percentiles[1]))
    if kind != "histmatch":
        raise ValueError(f"unknown intensity normalisation {intensity!r}")
    if reference is None:
        raise ValueError("histogram matching needs a reference dataset (alignment.reference)")
    return histogram_matching_table(source, quantiles=reference_quantiles(read_split(reference, "train").raw))


def tile_dataset(
    prepared: str | Path,
    out: str | Path,
    view: dict[str, Any],
    reference: str | Path | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    view_name: str | None = None,
) -> dict[str, int]:
    """Cut every split into the inputs of ``view`` (see grid.parse_view); returns the number of tiles per split.

    The file records its view (``view_name``, e.g. ``tile448o64``) and a digest of its
    content (``tiles_digest``), which every feature cache computed from it copies, so that
    a cache can never be used with tiles other than its own (``check_cache_matches_tiles``).
    """
    intensity = view.get("intensity", "raw")
    # Inductive (default): one map per dataset, fitted on its unlabelled training split and
    # applied to every split, so no statistic of the test images shapes their own input.
    # Transductive ('-trans'): each split normalised by its own statistics.
    transductive = intensity.endswith("-trans")
    shared = (
        None if transductive else intensity_table(read_split(prepared, "train").raw, intensity, reference, percentiles)
    )
    counts = {}
    digest = hashlib.sha256()
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        with open_h5(prepared) as source:
            split_names = list(source)
        for split_name in split_names:
            split = read_split(prepared, split_name)
            table = intensity_table(split.raw, intensity, reference, percentiles) if transductive else shared
            if table is not None:
                split.raw = table[split.raw]
            height, width = split.raw.shape[1:]
            grid_shape = (height, width)
            if view.get("pixel_size_nm"):
                split.raw, split.labels, grid_shape = resample_split(
                    split.raw, split.labels, pixel_size_of(prepared), float(view["pixel_size_nm"])
                )
            if view["mode"] == "tile":
                tile, overlap = view["tile_size"], view["overlap"]
                check_tile_fits(tile, *grid_shape, f"{prepared} ({split_name})", "tiling")
                grid = TileGrid.for_shape(*grid_shape, tile, overlap)
                raw = np.concatenate([extract_tiles(image, grid) for image in split.raw])
                labels = np.concatenate([extract_tiles(label, grid) for label in split.labels])
                positions = np.tile(np.array(grid.positions, dtype=np.int32), (len(split), 1))
            else:
                shape = resized_shape(height, width, view["longest_edge"], view["patch_size"])
                raw = resize_images(split.raw, shape, "bicubic")
                labels = resize_images(split.labels, shape, "nearest")
                positions = np.zeros((len(split), 2), dtype=np.int32)
                tile, overlap = max(shape), 0
            n_per_image = len(raw) // len(split)
            group = handle.create_group(split_name)
            group.attrs.update(
                {
                    "mode": view["mode"],
                    "intensity": intensity,
                    "height": height,
                    "intensity_statistics": "none"
                    if intensity == "raw"
                    else ("own split" if transductive else "train split"),
                    "width": width,
                    "tile": tile,
                    "overlap": overlap,
                    "tile_height": raw.shape[1],
                    "tile_width": raw.shape[2],
                    "grid_height": grid_shape[0],
                    "grid_width": grid_shape[1],
                }
            )
            if view.get("pixel_size_nm"):
                group.attrs["native_pixel_size_nm"] = json.dumps(list(pixel_size_of(prepared)))
                group.attrs["pixel_size_nm"] = float(view["pixel_size_nm"])
            chunks = (1, *raw.shape[1:])
            create_dataset(group, "raw", data=raw, chunks=chunks, compression="gzip", compression_opts=1)
            create_dataset(group, "labels", data=labels, chunks=chunks, compression="gzip", compression_opts=1)
            create_dataset(group, "image_index", data=np.repeat(np.arange(len(split), dtype=np.int32), n_per_image))
            create_dataset(group, "positions", data=positions)
            group.create_dataset("names", data=np.array(split.names, dtype=object), dtype=h5py.string_dtype())
            for part in (
                split_name,
                raw,
                labels,
                positions,
                "\n".join(split.names),
                json.dumps(dict(group.attrs), sort_keys=True, default=str),
            ):
                digest.update(part.encode() if isinstance(part, str) else np.ascontiguousarray(part).tobytes())
            counts[split_name] = len(raw)
        handle.attrs["view"] = view_name or ""
        handle.attrs["tiles_digest"] = digest.hexdigest()[:16]
    return counts


def tiles_provenance(path: str | Path) -> dict[str, str]:
    """The view and content digest a tiles file records (a file from before they existed: its bytes' hash)."""
    with open_h5(path) as handle:
        attrs = dict(handle.attrs)
    if "tiles_digest" in attrs:
        return {"tile_view": str(attrs.get("view", "")), "tiles_digest": str(attrs["tiles_digest"])}
    return {"tile_view": "", "tiles_digest": f"file:{file_sha256(path)[:16]}"}


def read_tiles(path: str | Path, split: str, with_pixels: bool = True, with_labels: bool = True) -> TileSet:
    """A split's tiles; without pixels or labels only their index (the arrays are empty, (0, h, w)),
    for readers that fetch the tiles batch by batch (data/streaming.py)."""
    with open_h5(path) as handle:
        group = handle[split]
        attrs = dict(group.attrs)
        empty = np.empty((0, *group["labels"].shape[1:]), np.uint8)
        return TileSet(
            raw=group["raw"][()] if with_pixels else empty,
            labels=group["labels"][()] if with_labels else empty,
            image_index=group["image_index"][()],
            positions=group["positions"][()],
            names=[decode(n) for n in group["names"][()]],
            height=int(attrs["height"]),
            width=int(attrs["width"]),
            tile=int(attrs["tile"]),
            overlap=int(attrs["overlap"]),
            mode=str(attrs.get("mode", "tile")),
            grid_height=int(attrs["grid_height"]) if "grid_height" in attrs else None,
            grid_width=int(attrs["grid_width"]) if "grid_width" in attrs else None,
        )
