"""Compute a backbone's features once and cache them, so no head training ever reruns it.

The published pipeline ran the frozen backbone again for every batch of every epoch
(defect 3); here each tile goes through the backbone exactly once per weights identity.

Cache layout, one HDF5 file per (backbone, dataset)::

    /<split>/tokens   float16 (n_tiles, C, h, w), chunked one tile per chunk
    /<split>/pooled   float32 (n_images, C)  one embedding per slice (domain analysis)
    /<split>/tile_pooled float32 (n_tiles, C)
    attrs             backbone name, family, patch size, weights identity, normalisation,
                      layers, pooling, tile size and overlap
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from em_foundation.backbones.base import Backbone
from em_foundation.data.tiles import read_tiles
from em_foundation.io import atomic_path


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
) -> dict[str, int]:
    """Run the backbone once over every tile of every split and write the cache atomically.

    ``precision``: ``auto`` is bf16 autocast on CUDA and float32 elsewhere.
    """
    backbone = backbone.to(device).eval()
    counts = {}
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs.update({key: json.dumps(value) if not isinstance(value, (str, int, float)) else value for key, value in {**backbone.describe(), **attrs}.items()})
        with h5py.File(tiles_path, "r") as tiles_file:
            split_names = list(tiles_file)
        for split_name in split_names:
            tiles = read_tiles(tiles_path, split_name)
            n_tiles = len(tiles.raw)
            grid_shape = tuple(side // backbone.patch_size for side in tiles.tile_shape)
            group = handle.create_group(split_name)
            tokens = group.create_dataset(
                "tokens",
                shape=(n_tiles, backbone.embed_dim, *grid_shape),
                dtype=np.float16,
                chunks=(1, backbone.embed_dim, *grid_shape),
            )
            tile_pooled = np.zeros((n_tiles, backbone.embed_dim), dtype=np.float32)
            with torch.inference_mode(), _autocast(device, precision):
                for start in tqdm(range(0, n_tiles, batch_size), desc=f"features {split_name}", unit="batch"):
                    batch = to_unit_float(tiles.raw[start : start + batch_size], device)
                    output = backbone(batch)
                    # Cast on the device: half the bytes cross to the host.
                    tokens[start : start + len(batch)] = output.grid.to(torch.float16).cpu().numpy()
                    tile_pooled[start : start + len(batch)] = output.pooled.float().cpu().numpy()
            n_images = len(tiles.names)
            pooled = np.stack([tile_pooled[tiles.image_index == i].mean(axis=0) for i in range(n_images)])
            group.create_dataset("pooled", data=pooled)
            group.create_dataset("tile_pooled", data=tile_pooled)
            counts[split_name] = n_tiles
    return counts


def read_tokens(path: str | Path, split: str, indices: np.ndarray | None = None) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        tokens = handle[split]["tokens"]
        return tokens[()] if indices is None else tokens[np.sort(indices)]


def read_cache_attrs(path: str | Path) -> dict[str, Any]:
    with h5py.File(path, "r") as handle:
        return dict(handle.attrs)
