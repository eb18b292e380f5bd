"""Helpers for the thin Snakemake script entry points."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def logged(log_path: str | Path) -> Iterator[None]:
    """Send stdout and stderr (tqdm progress included) into the rule's log file.

    A failure's traceback goes to the log too, then the exception propagates so that
    Snakemake marks the job failed and removes its outputs.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        try:
            yield
        except BaseException:
            traceback.print_exc(file=handle)
            raise


def unpack_prefixed(named: dict, prefix: str) -> dict[str, str]:
    """{'tiles_lucchi': path, ...} to {'lucchi': path, ...} for inputs named per dataset."""
    return {key[len(prefix):]: str(value) for key, value in named.items() if key.startswith(prefix)}
