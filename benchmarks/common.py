"""What every benchmark shares: settings, the result table, timing and memory helpers, the
benchmark tiles and the training settings taken from config.yaml."""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from em_foundation.config import load_config
from em_foundation.data.prepared import Split, write_prepared
from em_foundation.data.synthetic import generate_images
from em_foundation.data.tiles import tile_dataset
from em_foundation.grid import parse_view
from em_foundation.io import write_json

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["benchmark", "backbone", "setting", "value", "unit", "n_repeats", "note"]
NO_GPU = "not measured: no GPU"
DRY_RUN_FAILED = "dry run failed"


@lru_cache(maxsize=1)
def published() -> dict[str, Any]:
    """config.yaml as the workflow reads it (defaults filled): the settings benchmarks use."""
    return load_config(REPO / "config.yaml")


def vit_spec(model: str, tile: int = 448, **model_kwargs: Any) -> dict[str, Any]:
    """A timm DINOv2 entry with random weights (no download), as the config would resolve it."""
    return {
        "family": "dinov2",
        "model": model,
        "weights": "random",
        "model_kwargs": {"img_size": tile, **model_kwargs},
        "layers": [-1],
        "pooling": "mean",
        "normalisation": "family",
        "options": {},
        "revision": None,
    }


# Real architectures (random weights): published head width, published batch size.
VIT_S = ("ViT-S/14", vit_spec("vit_small_patch14_dinov2"))
VIT_L = ("ViT-L/14", vit_spec("vit_large_patch14_dinov2"))

# Real datasets: (name, slices, height, width) for the cache-size extrapolation.
REAL_DATASETS = [("lucchi", 165 + 165, 768, 1024), ("vnc", 20, 1024, 1024)]
VIT_DIMS = {"ViT-S": 384, "ViT-B": 768, "ViT-L": 1024, "ViT-g": 1536}


@dataclass
class Settings:
    backbones: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: [VIT_S, VIT_L])
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tile: int = 448
    overlap: int = 64
    n_tiles: int = 2  # tiles per epoch (CPU: one batch); epoch seconds scale with it, ratios hardly
    warmup_epochs: int = 1
    epochs: int = 3  # timed epochs after the warm-up, interleaved across the variants
    head_width: int = field(default_factory=lambda: published()["head"]["width"])
    batch_size: int = field(default_factory=lambda: published()["training"]["batch_size"])  # training batch
    cache_batch_size: int = 2  # CPU: the training batch; a GPU uses features.batch_size (below)
    cache_repeats: int = 2
    step_repeats: int = 10  # isolated head/backbone/LoRA steps (GPU only; CPU reuses the loops)
    dryrun: bool = True
    large_grid: bool = True
    dryrun_repeats: int = 3  # timed `-n --quiet` runs after the counting run (0: time the counting run)
    overhead_probe: bool = True  # per-batch caching overhead at the published batch size 8
    # the per-pixel forest (benchmarks/pixelforest.py): slices measured (train, test), their shape, threads
    pixelforest_slices: tuple[int, int] = (8, 4)
    pixelforest_shape: tuple[int, int] = (768, 1024)
    pixelforest_threads: int = 2

    @classmethod
    def for_device(cls, quick: bool = False) -> "Settings":
        s = cls()
        if s.device.type == "cuda":
            s = replace(
                s, n_tiles=64, epochs=3, cache_batch_size=published()["features"]["batch_size"], cache_repeats=3
            )
        if quick:
            s = replace(
                s,
                backbones=[VIT_S],
                n_tiles=2,
                warmup_epochs=0,
                epochs=1,
                cache_repeats=1,
                dryrun_repeats=1,
                cache_batch_size=min(s.cache_batch_size, 2),
                step_repeats=2,
                pixelforest_slices=(2, 1),
            )
        return s


def load1() -> float:
    return os.getloadavg()[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak resident memory of a stage: VmHWM after resetting it (Linux clear_refs 5).

    Falls back to ru_maxrss (the process's peak so far, an upper bound) where the reset is
    not allowed. On CUDA also the peak allocated GPU memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.exact = True
        self.peak_mib = 0.0  # the maximum over every use of this object
        self.gpu_mib: float | None = None
        self.start_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.start_mib != self.start_mib:  # first use
            self.start_mib = _rss_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            peak = _rss_mib("VmHWM")
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_mib = max(self.peak_mib, peak)
        if self.device.type == "cuda":
            self.gpu_mib = max(self.gpu_mib or 0.0, torch.cuda.max_memory_allocated(self.device) / 2**20)

    def note(self) -> str:
        how = "VmHWM reset at stage start" if self.exact else "ru_maxrss, process peak so far (upper bound)"
        return f"{how}; RSS at start {self.start_mib:.0f} MiB"


def _rss_mib(key: str) -> float:
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, benchmark: str, backbone: str, setting: str, value: float, unit: str, n: int, note: str = "") -> None:
        self.rows.append(
            dict(
                benchmark=benchmark,
                backbone=backbone,
                setting=setting,
                value=float(value),
                unit=unit,
                n_repeats=int(n),
                note=note,
            )
        )
        print(f"  {benchmark:<14} {backbone:<10} {setting:<48} {value:>12.4g} {unit:<8} n={n} {note}", flush=True)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    return f"min {min(values):.4g}, max {max(values):.4g}" if len(values) > 1 else "single run"


def make_tiles(root: Path, n_tiles: int, tile: int, overlap: int) -> tuple[Path, Path]:
    """``n_tiles`` synthetic FIB-SEM slices of exactly one tile each, through tile_dataset."""
    raw, labels = generate_images("fibsem", n_tiles, tile, tile, seed=0)
    names = [f"slice{i:03d}" for i in range(n_tiles)]
    prepared = root / "bench.h5"
    write_prepared(prepared, {"train": Split(raw, labels, names)}, {"dataset": "bench"})
    tiles = root / "bench.tiles.h5"
    tile_dataset(prepared, tiles, view=parse_view(f"tile{tile}o{overlap}"))
    split = root / "bench.split.json"
    write_json(split, {"train": names, "val": []})  # every tile trains: per-epoch time is training only
    return tiles, split


def training_config(settings: Settings, n_epochs: int) -> dict[str, Any]:
    """config.yaml's training block (optimiser, lr, weight decay, clipping) for ``n_epochs`` epochs."""
    training = dict(published()["training"])
    training.update(batch_size=settings.batch_size, max_epochs=n_epochs, patience=n_epochs + 1)
    return training


def lora_config() -> dict[str, Any]:
    """config.yaml's LoRA block (rank, alpha, dropout)."""
    return dict(published()["lora"])
