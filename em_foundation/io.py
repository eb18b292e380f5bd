"""File writing that never leaves a partial output behind, and reading that names a damaged file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Every HDF5 dataset the workflow writes carries a Fletcher-32 checksum per chunk, so a
# chunk damaged on disk fails to read instead of silently giving other numbers.
H5_CHECKSUM = {"fletcher32": True}


def create_dataset(group: Any, name: str, data: Any = None, **kwargs: Any) -> Any:
    """``group.create_dataset`` with a checksum wherever HDF5 allows a filter.

    Variable-length strings (names) and scalars cannot carry one; they are small, and their
    damage shows as a read error anyway.
    """
    import numpy as np

    dtype = kwargs.get("dtype", getattr(data, "dtype", None))
    shape = kwargs.get("shape", getattr(data, "shape", None))
    if dtype is not None and np.dtype(dtype).kind not in "OSUV" and shape:
        kwargs = {**H5_CHECKSUM, **kwargs}
    return group.create_dataset(name, data=data, **kwargs)


class DamagedFileError(RuntimeError):
    """A workflow file cannot be read as written; the message names it and says to rebuild it."""


def damaged(path: str | os.PathLike, detail: object) -> DamagedFileError:
    return DamagedFileError(
        f"{path} is damaged or unreadable ({detail}). Delete it and rerun the workflow: "
        "Snakemake rebuilds it from its inputs."
    )


@contextmanager
def open_h5(path: str | os.PathLike) -> Iterator[Any]:
    """Open an HDF5 file for reading; any HDF5 read error (truncated file, failed checksum,
    broken chunk) becomes a DamagedFileError naming the file.

    Everything that reads a workflow HDF5 file goes through here, so a damaged cache never
    reaches a user as h5py's bare "truncated file" or as silently different numbers.
    """
    import h5py

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise damaged(path, error) from None
    try:
        with handle:
            yield handle
    except DamagedFileError:
        raise
    except OSError as error:
        # Raised by h5py while reading this file's objects (errors of other files opened in
        # the same block are named by their own open_h5).
        raise damaged(path, error) from None


def check_finite(values: Any, path: str | os.PathLike, what: str) -> Any:
    """Tokens hold no NaN or infinity unless the file was damaged (or written by a broken backbone)."""
    import numpy as np

    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise damaged(path, f"{bad} non-finite values in {what}")
    return values


def _temporary(path: Path, suffix: str) -> Path:
    # One fixed name per output: a retry after a killed job overwrites the leftover of the
    # try before instead of leaking another hidden file of gigabytes.
    return path.with_name(f".{path.name}.tmp{suffix}")


def _remove_stale(path: Path, suffix: str) -> None:
    """Drop hidden leftovers of the random names this function used to create (mkstemp)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}{re.escape(suffix)}")
    for leftover in path.parent.glob(f".{path.name}.*"):
        if pattern.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A crash, a failed check or a killed job leaves no file at ``path``, so Snakemake
    (and a user) never mistakes a half-written HDF5 file for a finished one. The writer
    creates the temporary file itself, so the final file gets the permissions the umask
    gives every other file (readable by the group when the umask allows it).
    """
    path = Path(path)
    suffix = suffix if suffix is not None else ".tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, suffix)
    tmp_path = _temporary(path, suffix)
    tmp_path.unlink(missing_ok=True)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as error:
        if _is_disk_full(error):
            tmp_path.unlink(missing_ok=True)  # frees what the partial write took before the free space is read
            raise DiskFullError(path, error) from error
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


# What PyTorch's C++ writer says when a write fails (the OSError it hides is ENOSPC on a full disk).
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "iostream error", "file write failed", "PytorchStreamWriter failed")


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, DiskFullError):
        return False
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(text in str(error) for text in _TORCH_WRITE_FAILURES)


class DiskFullError(OSError):
    """A file could not be written because its disk (or quota) is full: names the file and the space left."""

    def __init__(self, path: Path, error: BaseException) -> None:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there now"
        except OSError:
            free = "free space unknown"
        certain = isinstance(error, OSError)
        cause = "the disk is full" if certain else "the write failed: the disk is full, or its quota"
        super().__init__(
            errno.ENOSPC,
            f"{path} could not be written: {cause}; {free} ({type(error).__name__}: {error}). Free space on that disk "
            "(or run with -d on a larger one) and rerun; nothing partial was left behind, and training resumes "
            "from its last complete checkpoint.",
        )


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically; the suffix is kept so tools that sniff it still work."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        tmp.write_text(text)


def write_csv(frame: Any, path: str | os.PathLike) -> None:
    """A pandas DataFrame to CSV without the index, atomically."""
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def decode(value: Any) -> str:
    """An HDF5 string (bytes from h5py, or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
