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
from em_foundation.feature_cache import read_cache_attrs, read_tokens
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
            handle.visititems(
                lambda name, obj: (
                    numeric.append(obj) if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiu" else None
                )
            )
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


KILLED_WRITER = """
import os, signal, sys
import h5py, numpy as np
from em_foundation.io import atomic_path, create_dataset
with atomic_path(sys.argv[1], suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
    create_dataset(handle, "tokens", data=np.ones((64, 8, 4, 4), np.float16))
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # as SLURM does at the time limit: no cleanup runs
"""


def test_a_killed_writer_leaves_nothing_behind_after_the_next_try(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cache" / "fibsem.h5"
    for _ in range(2):  # the SLURM profile retries: each killed try must not add a file
        result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
        assert result.returncode == -9, result.stderr
    left = sorted(p.name for p in out.parent.iterdir())
    assert len(left) == 1 and left[0].startswith(".fibsem.h5") and not out.exists(), left
    # a leftover of the random names atomic_path used to give goes too
    (out.parent / ".fibsem.h5.k3j_x9a2.h5").write_bytes(b"old")
    with atomic_path(out, suffix=".h5") as tmp:
        tmp.write_bytes(b"complete")
    assert sorted(p.name for p in out.parent.iterdir()) == ["fibsem.h5"]
    assert out.read_bytes() == b"complete"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_final_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "table.csv", suffix=".csv") as tmp:
            tmp.write_text("a,b\n")
        with open(tmp_path / "plain.csv", "w") as handle:
            handle.write("a,b\n")
    finally:
        os.umask(previous)
    mode = (tmp_path / "table.csv").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.csv").stat().st_mode & 0o777 == 0o666 & ~umask, oct(mode)


def test_a_failed_writer_leaves_no_output_and_no_temporary(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{")
            raise ValueError("check failed")
    assert list(tmp_path.iterdir()) == []


def test_tiles_larger_than_the_slices_are_refused_and_nothing_is_written(files, tmp_path):
    from em_foundation.config import ConfigError
    from em_foundation.data.tiles import tile_dataset

    out = tmp_path / "tiles.h5"
    with pytest.raises(ConfigError) as raised:
        tile_dataset(files["prepared"], out, view={"mode": "tile", "tile_size": 256, "overlap": 16})
    print(raised.value)
    assert "tiling.tile_size 256 is larger than the 128×128 slices of" in str(raised.value)
    assert "4.0× the pixels" in str(raised.value)
    assert list(tmp_path.iterdir()) == []
