"""Helpers for the thin Snakemake script entry points."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, TextIO

# A progress bar in a log file writes one line at most this often (and always its first and
# final state), instead of hundreds of carriage-return updates on one unreadable line.
PROGRESS_INTERVAL_S = 10.0


class ProgressLines(io.TextIOBase):
    """A text stream for log files that turns carriage-return progress updates into lines.

    tqdm redraws its bar with a leading '\\r'; a terminal overwrites the line, a log file
    keeps every redraw on one line. Here each redraw becomes its own line, at most one per
    ``interval`` seconds, and the last redraw is written when the bar ends.
    """

    def __init__(self, handle: TextIO, interval: float = PROGRESS_INTERVAL_S) -> None:
        self._handle, self._interval = handle, interval
        self._pending: str | None = None  # the latest redraw not yet written
        self._bar_open = False
        self._last = -float("inf")

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        head, *redraws = text.split("\r")
        if head:
            if self._bar_open:
                # Ordinary text after redraws: the bar ended (tqdm closes it with "\n"), so
                # its final state is written and the next bar shows its first state at once.
                self._flush_pending()
                self._bar_open, self._last = False, -float("inf")
                head = head[1:] if head.startswith("\n") else head
            self._handle.write(head)
        for redraw in redraws:
            if redraw.strip():
                self._redraw(redraw.rstrip("\n"))
        return len(text)

    def _redraw(self, line: str) -> None:
        self._bar_open = True
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._handle.write(line + "\n")
            self._pending, self._last = None, now
        else:
            self._pending = line

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._handle.write(self._pending + "\n")
            self._pending = None

    def flush(self) -> None:
        self._handle.flush()

    def close_bar(self) -> None:
        self._flush_pending()
        self.flush()


@contextlib.contextmanager
def logged(log_path: str | Path) -> Iterator[None]:
    """Send stdout and stderr (tqdm progress included, one line per update interval) into
    the rule's log file.

    A failure's traceback goes to the log too, then the exception propagates so that
    Snakemake marks the job failed and removes its outputs.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as handle:
        stream = ProgressLines(handle)
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            try:
                yield
            except BaseException:
                stream.close_bar()
                traceback.print_exc(file=handle)
                raise
            finally:
                stream.close_bar()


def warnings_to_console(level: int = logging.WARNING) -> None:
    """Send log records of ``level`` and above also where the user running Snakemake sees them.

    Inside ``logged`` stderr is the log file; ``sys.__stderr__`` is still the job's own
    stderr, which Snakemake shows on the console (local rules such as downloads) or keeps
    in the job's cluster log. An unverified download must not hide in a log file.
    """
    if sys.__stderr__ is None:
        return
    console = logging.StreamHandler(sys.__stderr__)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger().addHandler(console)


def unpack_prefixed(named: dict, prefix: str) -> dict[str, str]:
    """{'tiles_lucchi': path, ...} to {'lucchi': path, ...} for inputs named per dataset."""
    return {key[len(prefix) :]: str(value) for key, value in named.items() if key.startswith(prefix)}


def job_settings(job) -> dict:
    """The settings a job needs that cannot change its numbers: threads, data_in_memory, hub cache.

    They are not params (rules/common.smk compute_params): Snakemake reruns a job whose params
    changed, and these give the same numbers either way. They come from the rule's threads and
    from ``snakemake.config``, which every script receives but Snakemake never compares; the
    training record (run.json) keeps them. ``device`` comes from the params: it is a trigger.
    """
    config = getattr(job, "config", None) or {}
    return {
        "device": dict(job.params.get("compute", {})).get("device", "auto"),
        "threads": int(job.threads),
        "data_in_memory": config.get("compute", {}).get("data_in_memory", "auto"),
        "hub_cache_dir": config.get("hub", {}).get("cache_dir", "resources/weights"),
    }
