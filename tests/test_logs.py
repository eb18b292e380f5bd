"""Job logs are readable: progress bars become lines, not carriage-return redraws on one line."""

from __future__ import annotations

import sys

from tqdm import tqdm

import em_foundation.scripting as scripting
from em_foundation.scripting import logged


def test_progress_bar_in_a_log_writes_one_line_per_update_interval(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(scripting.time, "monotonic", lambda: clock["now"])
    log = tmp_path / "job.log"
    with logged(log):
        print("starting")
        for _ in tqdm(range(100), desc="epochs", mininterval=0, miniters=1):
            clock["now"] += 1.0  # 100 updates, one a second: one line per 10 s
        print("done", file=sys.stderr)
    text = log.read_text()
    print(text)
    assert "\r" not in text
    lines = text.splitlines()
    bars = [line for line in lines if line.startswith("epochs:")]
    assert 9 <= len(bars) <= 12, bars
    assert bars[0].startswith("epochs:   0%") and "100/100" in bars[-1]
    assert lines[0] == "starting" and lines[-1] == "done"
    assert len(lines) == len(bars) + 2


def test_a_failure_inside_the_log_still_ends_with_the_last_progress_and_the_traceback(tmp_path):
    log = tmp_path / "job.log"
    try:
        with logged(log):
            for step in tqdm(range(5), desc="features", mininterval=0, miniters=1):
                if step == 3:
                    raise ValueError("broken tile")
    except ValueError:
        pass
    text = log.read_text()
    assert "\r" not in text and "features:" in text
    assert text.rstrip().endswith("ValueError: broken tile")


def test_each_of_several_bars_shows_its_first_and_last_state(tmp_path):
    log = tmp_path / "job.log"
    with logged(log):
        for split in ("test", "train"):
            for _ in tqdm(range(5), desc=f"features {split}", mininterval=0, miniters=1):
                pass
    lines = log.read_text().splitlines()
    for split in ("test", "train"):
        bars = [line for line in lines if line.startswith(f"features {split}:")]
        assert bars[0].startswith(f"features {split}:   0%") and "5/5" in bars[-1], lines
