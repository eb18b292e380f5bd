"""What will the grid cost? GPU-hours and disk of a config, from measured per-tile and per-step costs.

    python -m benchmarks.cost [--configfile config.yaml] [--costs benchmarks/results-gpu.csv] [--epochs 100]

Book the cluster before starting: every stage's compute is the number of backbone and head
passes the grid will make (from the config's runs, datasets, views and training settings)
times a measured cost per pass, scaled to each backbone and input size by FLOPs that torch
counts on the real architectures (built on the meta device: nothing is allocated or
downloaded). Measured costs come from ``benchmarks.gpu_check`` (``results-gpu.csv``) when
present; otherwise from the CPU benchmark (``results-cpu.csv``), and then the hours are
hours of that CPU unless ``--speedup`` says how much faster the GPU is. Disk is exact
arithmetic on the cache layouts (float16 tokens, uint8 tiles before compression).

Early stopping makes the number of epochs unknowable in advance: the table gives the
expected cost at ``--epochs`` and the ceiling at ``training.max_epochs``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import h5py
import pandas as pd
import torch
import yaml

from em_foundation import grid
from em_foundation.backbones import build_backbone
from em_foundation.config import validate_config
from em_foundation.data.tile_grid import TileGrid
from em_foundation.data.tiles import resized_shape

REPO = Path(__file__).resolve().parents[1]
REFERENCE_TILE = 448  # both benchmarks measure 448² tiles with ViT-L/14 at batch 2
REFERENCE_SPEC = {
    "family": "dinov2",
    "model": "vit_large_patch14_dinov2",
    "weights": "random",
    "model_kwargs": {"img_size": REFERENCE_TILE},
    "layers": [-1],
    "pooling": "mean",
    "normalisation": "family",
    "options": {},
    "revision": None,
}

# Split sizes (slices, height, width) of the public datasets' converters, used when the
# dataset has not been prepared yet; a prepared file (--workdir) always wins.
KNOWN_SPLITS: dict[str, dict[str, tuple[int, int, int]]] = {
    "lucchi_pp": {"train": (165, 768, 1024), "test": (165, 768, 1024)},
}
VNC_SLICES, VNC_SIDE = 20, 1024
# Families computed on the CPU with SciPy filters: no GPU work, counted as zero FLOPs.
NOT_TORCH = frozenset({"filterbank"})


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of work on the measured device, so that any input size and backbone scale from them."""

    cache_s_per_tflop: float  # backbone forward (caching, evaluation, validation), per TFLOP
    head_s_per_pixel: float  # head training step, per sample and output pixel
    lora_s_per_tflop: float  # LoRA training step, per TFLOP of the sample's forward pass
    source: str
    device_hours: str  # what an hour of these costs is an hour of


@lru_cache(maxsize=None)
def forward_tflops(spec_key: str, height: int, width: int) -> tuple[float, int, int]:
    """(TFLOPs of one forward, channels, patch) of a backbone on one input, counted on the meta device."""
    import json

    from benchmarks.gpu_check import forward_flops

    spec = {**json.loads(spec_key), "weights": "random"}
    if grid.family_of(spec["family"]).segmenter:  # a whole segmenter (U-Net): its forward is the training unit
        from em_foundation.backbones import load

        with torch.device("meta"):
            model = load(grid.family_of(spec["family"]).builder)(spec)
            flops = forward_flops(lambda images: model(images, (height, width)), torch.empty(1, 1, height, width))
        return flops / 1e12, 0, model.patch_size
    if spec["family"] in NOT_TORCH:
        backbone = build_backbone(spec)
        return 0.0, backbone.embed_dim, backbone.patch_size
    with torch.device("meta"):
        backbone = build_backbone(spec)
        flops = forward_flops(backbone, torch.empty(1, 1, height, width))
    return flops / 1e12, backbone.embed_dim, backbone.patch_size


def backbone_forward(spec: dict[str, Any], height: int, width: int) -> tuple[float, int, int]:
    import json

    return forward_tflops(json.dumps(spec, sort_keys=True), height, width)


def _value(
    frame: pd.DataFrame, benchmark: str, unit: str, setting_contains: str = "", backbone: str | None = None
) -> float | None:
    rows = frame[
        (frame.benchmark == benchmark)
        & (frame.unit == unit)
        & frame.setting.str.contains(setting_contains, regex=False)
    ]
    if backbone is not None:
        rows = rows[rows.backbone == backbone]
    rows = rows.dropna(subset=["value"])
    return float(rows.value.iloc[0]) if len(rows) else None


def unit_costs(path: Path, speedup: float | None) -> UnitCosts:
    """Per-unit costs from a gpu_check table or, failing that, from the CPU benchmark table."""
    frame = pd.read_csv(path)
    tiles_per_s = _value(frame, "caching", "tiles/s", "cache_features")
    gflop_per_tile = _value(frame, "caching", "GFLOP")
    head_steps = _value(frame, "head", "steps/s")
    lora_steps = _value(frame, "lora", "steps/s")
    tile, batch = _value(frame, "setup", "px"), _value(frame, "setup", "tiles")
    factor = speedup or 1.0
    if None not in (tiles_per_s, gflop_per_tile, head_steps, lora_steps, tile, batch):
        device = next(
            note.rsplit("; ", 1)[-1] for note in frame.note if isinstance(note, str) and "HDF5 writes" in note
        )
        tflop = gflop_per_tile / 1e3
        return UnitCosts(
            1 / (tiles_per_s * tflop) / factor,
            1 / head_steps / (batch * tile * tile) / factor,
            1 / lora_steps / (batch * tflop) / factor,
            f"gpu_check ({path.name})",
            f"hours on {device}" + (f" / {speedup}" if speedup else ""),
        )
    # the CPU benchmark: ViT-L/14 rows, 448² tiles, batch 2
    tiles_per_s = _value(frame, "caching", "tiles/s", "cache_features", "ViT-L/14")
    head_step = _value(frame, "compute_bound", "s/batch", "head", "ViT-L/14")
    forward = _value(frame, "compute_bound", "s/batch", "backbone forward", "ViT-L/14")
    if None in (tiles_per_s, head_step, forward):
        raise SystemExit(
            f"{path}: neither gpu_check rows nor the CPU benchmark's ViT-L/14 caching and compute_bound rows; "
            "run `python -m benchmarks.gpu_check` on a GPU node or `python -m benchmarks.run`"
        )
    reference, _, _ = backbone_forward(REFERENCE_SPEC, REFERENCE_TILE, REFERENCE_TILE)
    # A LoRA step is a forward and a backward through the backbone (about twice the forward)
    # plus the head's step; the CPU benchmark does not time it.
    lora_step = 3 * forward + head_step
    hours = (
        f"GPU-hours at {speedup}x the benchmark CPU"
        if speedup
        else "hours of the benchmark CPU (give --speedup, or run gpu_check on a GPU node, for GPU-hours)"
    )
    batch = 2
    return UnitCosts(
        1 / (tiles_per_s * reference) / factor,
        head_step / (batch * REFERENCE_TILE**2) / factor,
        lora_step / (batch * reference) / factor,
        f"CPU benchmark ({path.name}); LoRA step estimated as 3 x forward + head step",
        hours,
    )


def dataset_splits(name: str, entry: dict[str, Any], workdir: Path | None) -> dict[str, tuple[int, int, int]]:
    """(slices, height, width) per split: from the prepared file when it exists, else from the converter."""
    prepared = workdir / "results" / "prepared" / f"{name}.h5" if workdir else None
    if prepared and prepared.exists():
        with h5py.File(prepared, "r") as handle:
            return {split: tuple(int(n) for n in handle[split]["raw"].shape) for split in handle}
    converter, options = entry["converter"], entry.get("options") or {}
    if converter == "synthetic":
        return {
            split: (int(options[f"n_{split}"]), int(options["height"]), int(options["width"]))
            for split in ("train", "test")
        }
    if converter == "vnc":
        n_test = int(options.get("n_test", 3))
        return {"train": (VNC_SLICES - n_test, VNC_SIDE, VNC_SIDE), "test": (n_test, VNC_SIDE, VNC_SIDE)}
    if converter in KNOWN_SPLITS:
        return KNOWN_SPLITS[converter]
    raise SystemExit(
        f"datasets.{name}: the size of converter {converter!r} is not known before preparing it; "
        f"run `snakemake --until prepare_dataset` and pass --workdir"
    )


def inputs_per_slice(config: dict[str, Any], spec: dict[str, Any], height: int, width: int) -> tuple[int, int, int]:
    """(inputs per slice, input height, input width) of the configured view."""
    tiling = config["tiling"]
    if tiling["mode"] == "tile":
        tiles = TileGrid.for_shape(height, width, tiling["tile_size"], tiling["overlap"])
        return len(tiles.positions), tiling["tile_size"], tiling["tile_size"]
    shape = resized_shape(height, width, tiling["longest_edge"], grid.patch_size_of(spec))
    return 1, *shape


def estimate(config: dict[str, Any], costs: UnitCosts, epochs: int, workdir: Path | None = None) -> pd.DataFrame:
    """One row per stage: jobs, TFLOPs of backbone work, hours at ``epochs`` and at max_epochs, bytes written."""
    training = config["training"]
    splits = {name: dataset_splits(name, entry, workdir) for name, entry in config["datasets"].items()}
    rows: dict[str, dict[str, float]] = {}

    def add(
        stage: str,
        jobs: int = 0,
        tflops: float = 0.0,
        hours: float = 0.0,
        ceiling: float | None = None,
        gib: float = 0.0,
    ) -> None:
        row = rows.setdefault(
            stage, dict(jobs=0, backbone_tflops=0.0, hours_expected=0.0, hours_ceiling=0.0, disk_gib=0.0)
        )
        row["jobs"] += jobs
        row["backbone_tflops"] += tflops
        row["hours_expected"] += hours
        row["hours_ceiling"] += hours if ceiling is None else ceiling
        row["disk_gib"] += gib

    # what one pass over each split of each dataset costs, per backbone
    per_split: dict[tuple[str, str, str], dict[str, float]] = {}
    for backbone, spec in config["backbones"].items():
        for dataset, shapes in splits.items():
            for split, (n_slices, height, width) in shapes.items():
                n_per, h, w = inputs_per_slice(config, spec, height, width)
                tflops, channels, patch = backbone_forward(spec, h, w)
                n = n_slices * n_per
                per_split[backbone, dataset, split] = dict(
                    inputs=n,
                    tflops=n * tflops,
                    pixels=n * h * w,
                    token_bytes=n * channels * (h // patch) * (w // patch) * 2,
                    pixel_bytes=2 * n * h * w,
                )
    views = {(grid.view_of(config, b), d) for b in config["backbones"] for d in splits}
    for view, dataset in sorted(views):
        backbone = next(b for b in config["backbones"] if grid.view_of(config, b) == view)
        add(
            "tile_dataset",
            jobs=1,
            gib=sum(per_split[backbone, dataset, s]["pixel_bytes"] for s in splits[dataset]) / 2**30,
        )
    for backbone in grid.feature_backbones(config):  # whole segmenters cache no features
        for dataset in splits:
            parts = [per_split[backbone, dataset, s] for s in splits[dataset]]
            tflops = sum(p["tflops"] for p in parts)
            add(
                "cache_features",
                jobs=1,
                tflops=tflops,
                hours=tflops * costs.cache_s_per_tflop / 3600,
                gib=sum(p["token_bytes"] for p in parts) / 2**30,
            )

    for run in grid.runs(config):
        train = [per_split[run.backbone, d, "train"] for d in config["training_sets"][run.train_set]]
        tests = [per_split[run.backbone, d, "test"] for d in grid.test_sets(config)]
        n_train = sum(p["inputs"] for p in train)
        val_share = math.ceil(n_train * training["val_fraction"]) / max(n_train, 1)
        pixels = sum(p["pixels"] for p in train)
        train_tflops = sum(p["tflops"] for p in train)
        test_pixels, test_tflops = sum(p["pixels"] for p in tests), sum(p["tflops"] for p in tests)
        if run.regime in grid.CACHED_REGIMES:
            # head steps on the training share; a validation pass is a forward, about a third of a step
            epoch_s = ((1 - val_share) + val_share / 3) * pixels * costs.head_s_per_pixel
            test_s, epoch_tflops, test_tflops = test_pixels * costs.head_s_per_pixel / 3, 0.0, 0.0
        else:
            epoch_s = (
                1 - val_share
            ) * train_tflops * costs.lora_s_per_tflop + val_share * train_tflops * costs.cache_s_per_tflop
            epoch_tflops = 3 * (1 - val_share) * train_tflops + val_share * train_tflops
            test_s = test_tflops * costs.cache_s_per_tflop
        add(
            f"train_{run.regime}",
            jobs=1,
            tflops=epochs * epoch_tflops,
            hours=epochs * epoch_s / 3600,
            ceiling=training["max_epochs"] * epoch_s / 3600,
        )
        add("evaluate", jobs=1, tflops=test_tflops, hours=test_s / 3600)
    frame = pd.DataFrame([{"stage": stage, **values} for stage, values in rows.items()])
    total = frame.drop(columns="stage").sum()
    return pd.concat([frame, pd.DataFrame([{"stage": "total", **total.to_dict()}])], ignore_index=True)


def default_costs() -> Path:
    gpu = REPO / "benchmarks" / "results-gpu.csv"
    return gpu if gpu.exists() else REPO / "benchmarks" / "results-cpu.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", type=Path, default=REPO / "config.yaml")
    parser.add_argument(
        "--costs",
        type=Path,
        help="a gpu_check or CPU benchmark CSV (default: results-gpu.csv if present, else results-cpu.csv)",
    )
    parser.add_argument(
        "--epochs", type=int, default=100, help="expected epochs per run before early stopping (default 100)"
    )
    parser.add_argument(
        "--speedup", type=float, help="how many times faster the GPU is than the CPU the costs were measured on"
    )
    parser.add_argument(
        "--workdir", type=Path, help="a workflow directory whose results/prepared/ gives the datasets' real sizes"
    )
    parser.add_argument("--out", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    config = validate_config(yaml.safe_load(args.configfile.read_text()), source=str(args.configfile))
    costs = unit_costs(args.costs or default_costs(), args.speedup)
    frame = estimate(config, costs, args.epochs, args.workdir)
    print(f"{args.configfile.name}: {len(grid.runs(config))} runs; costs from {costs.source}")
    print(
        f"hours are {costs.device_hours}; expected at {args.epochs} epochs per run, ceiling at max_epochs {config['training']['max_epochs']}\n"
    )
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        frame.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
