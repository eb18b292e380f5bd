"""Files the workflow writes: checksummed HDF5, damage reported with the file named, no
hidden leftovers after a killed job, and permissions from the umask."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from em_foundation.data.prepared import read_split
from em_foundation.data.tiles import read_tiles
from em_foundation.features import read_cache_attrs, read_tokens
from em_foundation.io import DamagedFileError, atomic_path
from tests.helpers import make_dataset


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("io"), "fibsem", "fibsem", n_train=2, n_test=1, seed=1)


def _copy(files, tmp_path, kind):
    target = tmp_path / Path(files[kind]).name
    shutil.copy(files[kind], target)
    return target


def _overwrite_chunk(path: Path, dataset: str, chunk: int, payload: bytes | None) -> None:
    """Replace one stored chunk's bytes in place (zeros when payload is None), as disk damage would."""
    with h5py.File(path, "r") as handle:
        info = handle[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(payload[: info.size] if payload is not None else bytes(info.size))


def test_every_numeric_dataset_is_written_with_a_checksum(files):
    for kind in ("prepared", "tiles", "features"):
        with h5py.File(files[kind], "r") as handle:
            numeric = []
            handle.visititems(lambda name, obj: numeric.append(obj) if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiu" else None)
            assert numeric, kind
            assert all(dataset.fletcher32 for dataset in numeric), [d.name for d in numeric if not d.fletcher32]


@pytest.mark.parametrize("damage", ["zeros", "random"])
def test_damaged_feature_chunk_is_refused_with_the_file_named(files, tmp_path, damage):
    cache = _copy(files, tmp_path, "features")
    payload = None if damage == "zeros" else np.random.default_rng(0).bytes(1 << 20)
    _overwrite_chunk(cache, "train/tokens", 1, payload)
    with pytest.raises(DamagedFileError) as raised:
        read_tokens(cache, "train")
    message = str(raised.value)
    print(message)
    assert str(cache) in message and "Delete it and rerun" in message


@pytest.mark.parametrize("kind", ["prepared", "tiles"])
def test_damaged_pixels_are_refused_with_the_file_named(files, tmp_path, kind):
    path = _copy(files, tmp_path, kind)
    _overwrite_chunk(path, "train/raw", 0, None)
    with pytest.raises(DamagedFileError, match=f"{path}.*Delete it and rerun"):
        read_split(path, "train") if kind == "prepared" else read_tiles(path, "train")


@pytest.mark.parametrize("reader", [read_cache_attrs, lambda path: read_tokens(path, "test")])
def test_truncated_cache_is_refused_with_the_file_named(files, tmp_path, reader):
    cache = _copy(files, tmp_path, "features")
    with open(cache, "r+b") as raw:
        raw.truncate(os.path.getsize(cache) // 2)
    with pytest.raises(DamagedFileError) as raised:
        reader(cache)
    message = str(raised.value)
    print(message)
    assert str(cache) in message and "truncated" in message and "Delete it and rerun" in message


def test_non_finite_tokens_are_refused_on_load(files, tmp_path):
    cache = _copy(files, tmp_path, "features")
    with h5py.File(cache, "r+") as handle:  # rewritten through HDF5, so the checksum still matches
        handle["test/tokens"][0, 0, 0, 0] = np.nan
    with pytest.raises(DamagedFileError, match=r"1 non-finite values in /test/tokens.*Delete it and rerun"):
        read_tokens(cache, "test")
