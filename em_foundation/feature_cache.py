"""Compute a backbone's features once and cache them, so no head training ever reruns it.

The published pipeline ran the frozen backbone again for every batch of every epoch
(defect 3 in docs/published-setup.md); here each tile goes through the backbone exactly once per weights identity.

Cache layout, one HDF5 file per (backbone, dataset)::

    /<split>/tokens   float16 (n_tiles, C, h, w), chunked one tile per chunk; float32 for
                      families whose Family.token_dtype says so (the filter bank)
    /<split>/pooled   float32 (n_images, C)  one embedding per slice (domain analysis)
    /<split>/tile_pooled float32 (n_tiles, C)
    /<split>/tokens_digest uint64 (n_tiles,) BLAKE2 digest of each tile's stored tokens
    attrs             backbone name, family, patch size, weights identity, normalisation,
                      layers, pooling, tile size and overlap; tile_view and tiles_digest of
                      the tiles file it was computed from (checked by every reader)
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from em_foundation.backbones.base import Backbone
from em_foundation.data.streaming import PREFETCH_DEPTH, BackgroundWriter, prefetched, read_rows
from em_foundation.data.tiles import read_tiles, tiles_provenance
from em_foundation.families import FAMILIES
from em_foundation.io import atomic_path, check_finite, create_dataset, damaged, open_h5


def to_unit_float(tiles: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, T, T) to float (B, 1, T, T) in [0, 1], the input every backbone takes.

    The uint8 pixels travel to the device first: a quarter of the bytes of float32.
    """
    return torch.from_numpy(np.ascontiguousarray(tiles)).to(device).float().div_(255.0).unsqueeze(1)


PRECISIONS = ("auto", "bf16", "fp32")


def _autocast(device: torch.device, precision: str = "auto"):
    # bf16 on GPUs halves memory and doubles throughput; CPU stays in float32 by default so
    # that results are exactly reproducible there. ``bf16`` forces autocast on any device,
    # so the GPU path can be exercised on a CPU.
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def cache_features(
    backbone: Backbone,
    tiles_path: str | Path,
    out: str | Path,
    batch_size: int,
    device: torch.device,
    attrs: dict[str, Any],
    precision: str = "auto",
    overlap_io: bool = True,
) -> dict[str, int]:
    """Run the backbone once over every tile of every split and write the cache atomically.

    ``precision``: ``auto`` is bf16 autocast on CUDA and float32 elsewhere.

    ``overlap_io``: a reader thread reads and decodes the next batches of tiles and a writer
    thread digests and writes the previous batches' tokens while the backbone runs on the
    current one (bounded queues, data/streaming.PREFETCH_DEPTH batches each way), so a GPU
    does not wait on the disk; only one split's per-tile pooled vectors stay in memory.
    The file is the same, byte for byte, as with ``overlap_io=False`` (one after another).
    """
    backbone = backbone.to(device).eval()
    counts = {}
    provenance = tiles_provenance(tiles_path)
    family = FAMILIES.get(getattr(backbone, "family", None) or "")
    token_dtype = family.token_dtype if family else "float16"  # float32 where float16 loses channels
    attrs = {**attrs, "token_dtype": token_dtype}
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs.update(
            {
                key: json.dumps(value) if not isinstance(value, (str, int, float)) else value
                for key, value in {**backbone.describe(), **attrs, **provenance}.items()
            }
        )
        with open_h5(tiles_path) as tiles_file:
            split_names = list(tiles_file)
        for split_name in split_names:
            tiles = read_tiles(tiles_path, split_name, with_pixels=False, with_labels=False)
            n_tiles = len(tiles.image_index)
            grid_shape = backbone.token_grid(*tiles.tile_shape)
            group = handle.create_group(split_name)
            tokens = create_dataset(
                group,
                "tokens",
                shape=(n_tiles, backbone.embed_dim, *grid_shape),
                dtype=token_dtype,
                chunks=(1, backbone.embed_dim, *grid_shape),
            )
            tile_pooled = np.zeros((n_tiles, backbone.embed_dim), dtype=np.float32)
            digests = np.zeros(n_tiles, dtype=np.uint64)
            starts = range(0, n_tiles, batch_size)
            depth = PREFETCH_DEPTH if overlap_io else 0

            def read(start: int, split: str = split_name) -> tuple[int, np.ndarray]:
                with open_h5(tiles_path) as source:
                    return start, source[split]["raw"][start : start + batch_size]

            def write(item: tuple[int, np.ndarray, np.ndarray], dataset: Any = tokens, out_digests=digests) -> None:
                start, grid, pooled = item
                dataset[start : start + len(grid)] = grid
                out_digests[start : start + len(grid)] = tile_digests(grid)
                tile_pooled[start : start + len(grid)] = pooled

            with torch.inference_mode(), _autocast(device, precision), BackgroundWriter(write, depth) as writer:
                batches = prefetched(starts, read, depth)
                for start, raw in tqdm(batches, total=len(starts), desc=f"features {split_name}", unit="batch"):
                    output = backbone(to_unit_float(raw, device))
                    # Cast on the device: half the bytes cross to the host.
                    grid = output.grid.to(getattr(torch, token_dtype)).cpu().numpy()
                    writer.put((start, grid, output.pooled.float().cpu().numpy()))
            n_images = len(tiles.names)
            pooled = np.stack([tile_pooled[tiles.image_index == i].mean(axis=0) for i in range(n_images)])
            create_dataset(group, "pooled", data=pooled)
            create_dataset(group, "tile_pooled", data=tile_pooled)
            create_dataset(group, "tokens_digest", data=digests)
            counts[split_name] = n_tiles
    return counts


def tile_digests(tokens: np.ndarray) -> np.ndarray:
    """One 64-bit BLAKE2 digest per tile of a (n, C, h, w) token array.

    HDF5's Fletcher-32 checksum cannot see a chunk zeroed whole (the checksum of zeros is
    zero) and the tokens are stored uncompressed for speed, so each tile carries its own digest.
    """
    tokens = np.ascontiguousarray(tokens)
    return np.array(
        [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") for row in tokens],
        dtype=np.uint64,
    )


class CheckedTokens:
    """A cache's ``/<split>/tokens`` read row-wise, each read checked against the stored
    digests and for finiteness, so damage stops the run with the file named."""

    def __init__(self, handle: Any, split: str, path: str | Path, digests: np.ndarray | None = None) -> None:
        group = handle[split]
        self._tokens, self._path, self._what = group["tokens"], path, f"/{split}/tokens"
        # Caches written before digests existed are read with the checksum and finiteness checks only.
        # A reader of many batches passes the digests it read once (read_digests).
        if digests is None and "tokens_digest" in group:
            digests = group["tokens_digest"][()]
        self._digests = digests
        self.shape, self.dtype = self._tokens.shape, self._tokens.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        values = read_rows(self._tokens, rows) if isinstance(rows, np.ndarray) else self._tokens[rows]
        check_finite(values, self._path, self._what)
        if self._digests is not None:
            expected = self._digests[rows]
            bad = np.flatnonzero(tile_digests(values) != expected)
            if len(bad):
                index = np.arange(len(self))[rows][bad]
                raise damaged(
                    self._path,
                    f"{len(bad)} tiles of {self._what} differ from their stored digest, first tile {index[0]}",
                )
        return values


class StaleCacheError(ValueError):
    """A feature cache was computed from other tiles than the ones it is used with."""


def check_cache_matches_tiles(features: str | Path, tiles: str | Path) -> None:
    """Refuse a feature cache whose recorded tiles (view and content digest) are not ``tiles``.

    Tokens are matched to labels by position, so a cache from another tiling (another view,
    another intensity normalisation, a re-tiled dataset) would silently pair every token
    with the wrong pixels.
    """
    attrs = read_cache_attrs(features)
    current = tiles_provenance(tiles)
    recorded = {key: str(attrs.get(key, "")) for key in ("tile_view", "tiles_digest")}
    if not recorded["tiles_digest"]:
        raise StaleCacheError(
            f"feature cache {features} does not record which tiles it was computed from (written by an older "
            f"version); it cannot be checked against {tiles}: delete {features} and rerun"
        )
    if recorded["tiles_digest"] != current["tiles_digest"] or (
        recorded["tile_view"] and current["tile_view"] and recorded["tile_view"] != current["tile_view"]
    ):
        raise StaleCacheError(
            f"feature cache {features} was computed from tiles {recorded['tile_view'] or '?'} (digest "
            f"{recorded['tiles_digest']}), but {tiles} holds tiles {current['tile_view'] or '?'} (digest "
            f"{current['tiles_digest']}): delete {features} and rerun to recompute it from these tiles"
        )


def read_tokens(path: str | Path, split: str, indices: np.ndarray | None = None) -> np.ndarray:
    """Cached tokens, checked: a damaged cache stops the run with the file named."""
    with open_h5(path) as handle:
        tokens = CheckedTokens(handle, split, path)
        return tokens[slice(None)] if indices is None else tokens[np.sort(indices)]


def read_digests(path: str | Path, split: str) -> np.ndarray | None:
    """A cache's per-tile token digests (None for caches written before they existed)."""
    with open_h5(path) as handle:
        group = handle[split]
        return group["tokens_digest"][()] if "tokens_digest" in group else None


def read_cache_attrs(path: str | Path) -> dict[str, Any]:
    with open_h5(path) as handle:
        return dict(handle.attrs)
