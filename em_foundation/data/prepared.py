"""The prepared-dataset HDF5 format every later stage reads.

One file per dataset, at native resolution::

    /<split>/raw      uint8 (N, H, W)   grayscale slices
    /<split>/labels   uint8 (N, H, W)   0 background, 1 mitochondria, 255 ignore (unlabelled)
    /<split>/names    str (N,)          slice name, e.g. "12"
    /<split>/sources  str (N,)          source files the slice came from ("image|label")
    attrs             dataset, converter, voxel_size_nm, pixel_size_nm (y, x), licence, citation, url, sha256, ...

Splits are ``train`` and ``test``. Keeping names and sources beside the arrays lets a
reader check the image-label pairing instead of trusting file order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from em_foundation.io import atomic_path, create_dataset, decode, open_h5

IGNORE_LABEL = 255
SPLITS = ("train", "test")


@dataclass
class Split:
    raw: np.ndarray
    labels: np.ndarray
    names: list[str]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.raw.shape != self.labels.shape or self.raw.ndim != 3:
            raise ValueError(f"raw {self.raw.shape} and labels {self.labels.shape} must both be (N, H, W)")
        if len(self.names) != len(self.raw):
            raise ValueError(f"{len(self.names)} names for {len(self.raw)} slices")
        if not self.sources:
            self.sources = list(self.names)

    def __len__(self) -> int:
        return len(self.raw)


def write_prepared(path: str | Path, splits: dict[str, Split], attrs: dict[str, Any]) -> None:
    """Write all splits atomically; attrs that are not scalars or strings are stored as JSON."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            for key, value in attrs.items():
                handle.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
            for split_name, split in splits.items():
                group = handle.create_group(split_name)
                chunks = (1, *split.raw.shape[1:])
                create_dataset(
                    group, "raw", data=split.raw.astype(np.uint8), chunks=chunks, compression="gzip", compression_opts=1
                )
                create_dataset(
                    group,
                    "labels",
                    data=split.labels.astype(np.uint8),
                    chunks=chunks,
                    compression="gzip",
                    compression_opts=1,
                )
                group.create_dataset("names", data=np.array(split.names, dtype=object), dtype=h5py.string_dtype())
                group.create_dataset("sources", data=np.array(split.sources, dtype=object), dtype=h5py.string_dtype())


def read_split(path: str | Path, split: str) -> Split:
    with open_h5(path) as handle:
        if split not in handle:
            raise KeyError(f"{path}: no split {split!r}; has {', '.join(handle)}")
        group = handle[split]
        return Split(
            raw=group["raw"][()],
            labels=group["labels"][()],
            names=[decode(n) for n in group["names"][()]],
            sources=[decode(s) for s in group["sources"][()]],
        )


def read_attrs(path: str | Path) -> dict[str, Any]:
    with open_h5(path) as handle:
        return {key: (value.item() if hasattr(value, "item") else value) for key, value in handle.attrs.items()}


def pixel_size_of(prepared_path: str | Path) -> tuple[float, float]:
    """The in-plane pixel size (y, x) in nm that a prepared dataset records.

    Files prepared before ``pixel_size_nm`` was recorded fall back on their ``voxel_size_nm``.
    Object metrics use it to report sizes in nm rather than pixels.
    """
    attrs = read_attrs(prepared_path)
    for key in ("pixel_size_nm", "voxel_size_nm"):
        if key in attrs:
            value = attrs[key]
            values = json.loads(value) if isinstance(value, str) else list(value)
            return float(values[0]), float(values[1])
    raise KeyError(f"{prepared_path}: records no pixel size (attrs: {', '.join(sorted(attrs))}); prepare it again")
