"""Benchmarks for defect 3 (the frozen backbone rerun every batch): is the feature cache worth it?

    python -m benchmarks.run [--quick] [--out benchmarks/results.csv]

Measures, side by side in one process and on one device (CUDA if available, else CPU), one
module each:

1. ``head_training``: seconds per epoch on cached tokens (the real path: ``cache_features`` →
   ``load_training_data`` → ``fit``), against the same training with the frozen backbone
   run online for every batch, and against the bare head step on in-memory tensors (floor);
   plus the compute bound (backbone forward + head step) / head step, measured in isolation;
2. ``caching``: ``cache_features`` throughput against a bare ``model.forward_features`` loop, and
   where the caching overhead per batch goes (uint8 → float, fp32 → fp16 conversion, HDF5 write);
3. ``cache_size``: feature-cache size (measured, and extrapolated per real dataset and ViT size);
   every stage records its peak resident memory;
4. ``dry_run``: Snakemake dry-run time of the published grid and of a grid about ten times larger;
5. ``pixelforest``: the per-pixel forest's training and prediction seconds and peak memory per
   100 slices of 768×1024 (benchmarks/pixelforest.py; also runnable alone);
6. ``gpu``, on a GPU only: ViT-L caching under bf16 (tiles/s, peak GPU memory) and the LoRA step.

Every training step is ``em_foundation.training.trainer.train_step`` with the optimiser,
learning rate, weight decay, clipping and LoRA settings of config.yaml. Every number is a
median over repeats; the 1-minute load average is recorded with each measurement because
other jobs may share the machine. See benchmarks/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: keep the table readable

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.cache_size import bench_cache_extrapolation, bench_cache_size  # noqa: E402
from benchmarks.caching import bench_cache_overhead, bench_caching  # noqa: E402
from benchmarks.common import (  # noqa: E402, F401 (COLUMNS, DRY_RUN_FAILED, NO_GPU, vit_spec: the public names)
    COLUMNS,
    DRY_RUN_FAILED,
    NO_GPU,
    REPO,
    Settings,
    Table,
    make_tiles,
    vit_spec,
)
from benchmarks.dry_run import bench_dry_runs  # noqa: E402
from benchmarks.gpu import bench_gpu_lora  # noqa: E402
from benchmarks.head_training import bench_training  # noqa: E402
from benchmarks.pixelforest import bench_pixelforest  # noqa: E402
from em_foundation.backbones import build_backbone  # noqa: E402


def run_benchmarks(settings: Settings, workdir: Path | None = None) -> pd.DataFrame:
    table = Table()
    started = time.perf_counter()
    start_load = os.getloadavg()
    print(
        f"device {settings.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"loadavg {start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}",
        flush=True,
    )
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="em-bench-")) if owned else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        tiles, split = make_tiles(root, settings.n_tiles, settings.tile, settings.overlap)
        overhead_done = False
        for label, spec in settings.backbones:
            t0 = time.perf_counter()
            backbone = build_backbone(spec)
            print(f"{label}: built in {time.perf_counter() - t0:.1f} s ({spec['model']}, random weights)", flush=True)
            cache, forward_per_batch = bench_caching(settings, table, label, backbone, tiles, root)
            bench_cache_size(settings, table, label, cache, backbone.embed_dim, backbone.patch_size)
            bench_training(settings, table, label, backbone, tiles, split, cache, root, forward_per_batch)
            if settings.overhead_probe and not overhead_done and label == settings.backbones[-1][0]:
                bench_cache_overhead(settings, table, label, backbone.embed_dim, backbone.patch_size, root)
                overhead_done = True
            del backbone
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
        bench_cache_extrapolation(settings, table)
        (root / "pixelforest").mkdir(exist_ok=True)
        bench_pixelforest(
            table,
            root / "pixelforest",
            *settings.pixelforest_slices,
            threads=settings.pixelforest_threads,
            shape=settings.pixelforest_shape,
        )
        if settings.dryrun:
            bench_dry_runs(settings, table, root)
        bench_gpu_lora(settings, table)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    end_load = os.getloadavg()
    total = time.perf_counter() - started
    table.add(
        "machine",
        "-",
        "loadavg 1/5/15 min at start",
        start_load[0],
        "load",
        1,
        f"{start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
    )
    table.add(
        "machine",
        "-",
        "loadavg 1/5/15 min at end",
        end_load[0],
        "load",
        1,
        f"{end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}",
    )
    table.add(
        "machine",
        "-",
        "total benchmark time",
        total,
        "s",
        1,
        f"device {settings.device.type}; torch {torch.__version__}",
    )
    return table.frame()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S only, 2 tiles, 1 epoch, single repeats")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.csv")
    parser.add_argument("--tiles", type=int, help="tiles per epoch (default 2 on CPU, 64 on GPU)")
    parser.add_argument("--epochs", type=int, help="timed epochs after the warm-up")
    args = parser.parse_args(argv)
    settings = Settings.for_device(quick=args.quick)
    if args.tiles:
        settings = replace(settings, n_tiles=args.tiles)
    if args.epochs:
        settings = replace(settings, epochs=args.epochs)
    frame = run_benchmarks(settings)
    print()
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
