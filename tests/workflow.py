"""Run the workflow from tests: real snakemake processes on the demo, in temporary directories."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def demo_config() -> dict:
    return yaml.safe_load((REPO / "profiles/demo/workflow_config.yaml").read_text())


def demo_runs_per_model(n_seeds: int | None = None) -> int:
    """Trained models per backbone × regime in the demo: training sets × their label-efficiency sizes × seeds."""
    from em_foundation.config import validate_config
    from em_foundation.grid import n_train_slices_for

    config = validate_config(demo_config())
    sizes = sum(len(n_train_slices_for(config, train_set)) for train_set in config["training_sets"])
    return sizes * (len(config["seeds"]) if n_seeds is None else n_seeds)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(
    workdir: Path, *args: str, configfile: Path | None = None, check: bool = True, timeout: int = 1800
) -> subprocess.CompletedProcess:
    """Run snakemake with the demo profile (or a config file that replaces its config)."""
    command = SNAKEMAKE + ["-d", str(workdir), "--profile", str(REPO / "profiles/demo")] + list(args)
    if configfile is not None:  # last: --configfile takes every following word as a file
        command += ["--configfile", str(configfile)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def scheduled_jobs(result: subprocess.CompletedProcess) -> Counter:
    """Rule -> job count from the 'Job stats' table of a dry-run."""
    text = result.stdout + result.stderr
    counts: Counter = Counter()
    if "Job stats:" not in text:
        return counts
    table = text.split("Job stats:", 1)[1]
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts
