"""Snakemake dry-run time of the published grid and of a grid about ten times larger."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import DRY_RUN_FAILED, REPO, Settings, Table, load1, median, spread


def large_config() -> dict[str, Any]:
    """About ten times the published grid: 10 seeds, 7 backbones, 4 datasets, 7 training sets."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    vnc = config["datasets"]["vnc"]
    for copy_name in ("vnc2", "vnc3"):
        config["datasets"][copy_name] = copy.deepcopy(vnc)
    config["training_sets"] = {
        "lucchi": ["lucchi"],
        "vnc": ["vnc"],
        "vnc2": ["vnc2"],
        "vnc3": ["vnc3"],
        "paired": ["lucchi", "vnc"],
        "paired2": ["lucchi", "vnc2"],
        "paired3": ["lucchi", "vnc3"],
    }
    config["backbones"].update(
        {
            "dinov2S": {"family": "dinov2", "model": "vit_small_patch14_dinov2.lvd142m"},
            "dinov2B": {"family": "dinov2", "model": "vit_base_patch14_dinov2.lvd142m"},
            "dinov2g": {"family": "dinov2", "model": "vit_giant_patch14_dinov2.lvd142m"},
            "dinov3B": {"family": "dinov3", "model": "vit_base_patch16_dinov3.lvd1689m"},
        }
    )
    config["seeds"] = list(range(10))
    return config


def snakemake_exe() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def dry_run(args: list[str], workdir: Path) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run(
        snakemake_exe() + ["-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def bench_dry_runs(settings: Settings, table: Table, root: Path) -> None:
    grids = [("published", [])]
    if settings.large_grid:
        path = root / "large-config.yaml"
        path.write_text(yaml.safe_dump(large_config(), sort_keys=False))
        grids.append(("10x grid", ["--configfile", str(path)]))
    counts = {}
    for name, extra in grids:
        workdir = root / f"dryrun-{name.replace(' ', '')}"
        workdir.mkdir()
        label = (
            "default config.yaml" if not extra else "--configfile (10 seeds, 7 backbones, 4 datasets, 7 training sets)"
        )
        setting = f"snakemake -n --quiet, {name}: {label}"
        try:
            # first call counts the jobs (job-stats table kept) and warms the file-system caches
            first, output = dry_run([*extra, "--quiet", "rules", "reason", "host"], workdir)
            totals = re.findall(r"^total\s+(\d+)\s*$", output, flags=re.M)
            if not totals:
                raise RuntimeError(f"no job count in the dry-run output:\n{output[-2000:]}")
            counts[name] = int(totals[-1])
            times, loads = [], [load1()]
            for _ in range(settings.dryrun_repeats):
                loads.append(load1())
                times.append(dry_run([*extra, "--quiet"], workdir)[0])
            if not times:  # dryrun_repeats 0 (the smoke test): the counting run is the measurement
                times = [first]
        except RuntimeError as error:  # the workflow itself is broken: say so, keep the other numbers
            last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
            table.rows.append(
                dict(
                    benchmark="dry_run",
                    backbone="-",
                    setting=setting,
                    value=float("nan"),
                    unit="s",
                    n_repeats=0,
                    note=f"{DRY_RUN_FAILED}: {last[:300]}",
                )
            )
            print(f"  dry_run        {setting}: {DRY_RUN_FAILED}: {last}", flush=True)
            continue
        table.add(
            "dry_run",
            "-",
            setting,
            median(times),
            "s",
            len(times),
            f"{counts[name]} jobs; {spread(times)}; first (counting) run {first:.2f} s; load1 {min(loads):.2f}-{max(loads):.2f}"
            + ("; target < 10 s" if not extra else ""),
        )
        table.add(
            "dry_run",
            "-",
            f"jobs in the DAG, {name}",
            counts[name],
            "jobs",
            1,
            "incl. download_dataset and fetch_weights (dry run: nothing downloaded)",
        )
    if len(counts) == 2:
        table.add(
            "dry_run", "-", "job ratio 10x grid / published", counts["10x grid"] / counts["published"], "x", 1, ""
        )
