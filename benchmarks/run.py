"""Benchmarks for defect 3 (the frozen backbone rerun every batch): is the feature cache worth it?

    python -m benchmarks.run [--quick] [--out benchmarks/results.csv]

Measures, side by side in one process and on one device (CUDA if available, else CPU):

1. head training seconds per epoch on cached tokens (the real path: ``cache_features`` →
   ``load_training_data`` → ``fit``), against the same training with the frozen backbone
   run online for every batch, and against the bare head step on in-memory tensors (floor);
   plus the compute bound (backbone forward + head step) / head step, measured in isolation;
2. ``cache_features`` throughput against a bare ``model.forward_features`` loop, and where
   the caching overhead per batch goes (uint8 → float, fp32 → fp16 conversion, HDF5 write);
3. feature-cache size (measured, and extrapolated per real dataset and ViT size) and the
   peak resident memory of every stage;
4. Snakemake dry-run time of the published grid and of a grid about ten times larger;
5. on a GPU only: ViT-L caching under bf16 (tiles/s, peak GPU memory) and the LoRA step.

Every number is a median over repeats; the 1-minute load average is recorded with each
measurement because other jobs may share the machine. See benchmarks/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: keep the table readable

import argparse
import contextlib
import copy
import io
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from em_foundation.backbones import build_backbone
from em_foundation.data.prepared import Split, write_prepared
from em_foundation.data.synthetic import generate_images
from em_foundation.data.tiles import read_tiles, tile_dataset
from em_foundation.data.tile_grid import TileGrid
from em_foundation.feature_cache import cache_features, to_unit_float
from em_foundation.io import write_json
from em_foundation.training.losses import soft_dice_loss
from em_foundation.training.run import load_training_data
from em_foundation.training.sampling import epoch_batches
from em_foundation.training.segmenter import CachedFeatureSegmenter, build_segmenter
from em_foundation.training.trainer import fit

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["benchmark", "backbone", "setting", "value", "unit", "n_repeats", "note"]
NO_GPU = "not measured: no GPU"
DRY_RUN_FAILED = "dry run failed"


def vit_spec(model: str, tile: int = 448, **model_kwargs: Any) -> dict[str, Any]:
    """A timm DINOv2 entry with random weights (no download), as the config would resolve it."""
    return {
        "family": "dinov2", "model": model, "weights": "random", "model_kwargs": {"img_size": tile, **model_kwargs},
        "layers": [-1], "pooling": "mean", "normalisation": "family", "options": {}, "revision": None,
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
    head_width: int = 512
    batch_size: int = 2  # training batch (published)
    cache_batch_size: int = 2  # published features.batch_size is 8 (the GPU default below)
    cache_repeats: int = 2
    step_repeats: int = 10  # isolated head/backbone/LoRA steps (GPU only; CPU reuses the loops)
    dryrun: bool = True
    large_grid: bool = True
    dryrun_repeats: int = 3  # timed `-n --quiet` runs after the counting run (0: time the counting run)
    overhead_probe: bool = True  # per-batch caching overhead at the published batch size 8

    @classmethod
    def for_device(cls, quick: bool = False) -> "Settings":
        s = cls()
        if s.device.type == "cuda":
            s = replace(s, n_tiles=64, epochs=3, cache_batch_size=8, cache_repeats=3)
        if quick:
            s = replace(s, backbones=[VIT_S], n_tiles=2, warmup_epochs=0, epochs=1, cache_repeats=1, dryrun_repeats=1,
                        cache_batch_size=min(s.cache_batch_size, 2), step_repeats=2)
        return s


# --------------------------------------------------------------------------- helpers


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
        self.rows.append(dict(benchmark=benchmark, backbone=backbone, setting=setting, value=float(value), unit=unit, n_repeats=int(n), note=note))
        print(f"  {benchmark:<14} {backbone:<10} {setting:<48} {value:>12.4g} {unit:<8} n={n} {note}", flush=True)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    return f"min {min(values):.4g}, max {max(values):.4g}" if len(values) > 1 else "single run"


# --------------------------------------------------------------------------- data


def make_tiles(root: Path, n_tiles: int, tile: int, overlap: int) -> tuple[Path, Path]:
    """``n_tiles`` synthetic FIB-SEM slices of exactly one tile each, through tile_dataset."""
    raw, labels = generate_images("fibsem", n_tiles, tile, tile, seed=0)
    names = [f"slice{i:03d}" for i in range(n_tiles)]
    prepared = root / "bench.h5"
    write_prepared(prepared, {"train": Split(raw, labels, names)}, {"dataset": "bench"})
    tiles = root / "bench.tiles.h5"
    tile_dataset(prepared, tiles, tile=tile, overlap=overlap)
    split = root / "bench.split.json"
    write_json(split, {"train": names, "val": []})  # every tile trains: per-epoch time is training only
    return tiles, split


def training_config(settings: Settings, n_epochs: int) -> dict[str, Any]:
    training = dict(yaml.safe_load((REPO / "config.yaml").read_text())["training"])
    training.update(batch_size=settings.batch_size, max_epochs=n_epochs, patience=n_epochs + 1)
    return training


# --------------------------------------------------------------------------- 2: caching


def bench_caching(settings: Settings, table: Table, label: str, backbone: nn.Module, tiles: Path, root: Path) -> tuple[Path, list[float]]:
    """cache_features against a bare forward_features loop over the same tensors."""
    device = settings.device
    backbone = backbone.to(device).eval()
    raw = read_tiles(tiles, "train").raw
    n, bs = len(raw), settings.cache_batch_size
    with torch.inference_mode():
        inputs = backbone.normalise(to_unit_float(raw).to(device))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with autocast:
            backbone.model.forward_features(inputs[: bs if device.type == "cuda" else 1])  # warm-up, untimed
    sync(device)

    def bare() -> tuple[float, list[float]]:
        per_batch = []
        with torch.inference_mode(), (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)):
            sync(device)
            started = time.perf_counter()
            for start in range(0, n, bs):
                t0 = time.perf_counter()
                backbone.model.forward_features(inputs[start : start + bs])
                sync(device)
                per_batch.append(time.perf_counter() - t0)
            sync(device)
        return time.perf_counter() - started, per_batch

    cache_times, bare_times, per_batch, loads = [], [], [], []
    cache_path = root / f"features-{label.replace('/', '')}.h5"
    memory = PeakMemory(device)
    for r in range(settings.cache_repeats):
        order = ("bare", "cache") if r % 2 == 0 else ("cache", "bare")  # alternate against drift
        for kind in order:
            loads.append(load1())
            if kind == "bare":
                seconds, batches = bare()
                bare_times.append(seconds)
                per_batch += batches
            else:
                with memory:
                    sync(device)
                    started = time.perf_counter()
                    cache_features(backbone, tiles, cache_path, bs, device, {"backbone": label, "tile": settings.tile, "overlap": settings.overlap})
                    sync(device)
                    cache_times.append(time.perf_counter() - started)
    r = settings.cache_repeats
    load = f"load1 {min(loads):.2f}-{max(loads):.2f}"
    cache_tps, bare_tps = n / median(cache_times), n / median(bare_times)
    setting = f"{n} tiles {settings.tile}px, batch {bs}, {device.type}{' bf16' if device.type == 'cuda' else ' fp32'}"
    table.add("caching", label, f"cache_features, {setting}", cache_tps, "tiles/s", r, f"median; s {spread(cache_times)}; {load}")
    table.add("caching", label, f"bare forward_features loop, {setting}", bare_tps, "tiles/s", r, f"the limit; s {spread(bare_times)}; {load}")
    table.add("caching", label, "ratio cache_features / bare loop (throughput)", cache_tps / bare_tps, "x", r, "target >= 0.85 (within 15 %)")
    table.add("memory", label, "peak RSS, caching stage (cache_features)", memory.peak_mib, "MiB", 1, memory.note())
    if memory.gpu_mib is not None:
        table.add("gpu", label, f"peak GPU memory allocated, caching (bf16, batch {bs})", memory.gpu_mib, "MiB", 1, "torch.cuda.max_memory_allocated")
    return cache_path, per_batch


def bench_cache_overhead(settings: Settings, table: Table, label: str, embed_dim: int, patch: int, root: Path) -> None:
    """What cache_features does per batch besides the forward, at the published batch size 8.

    Isolated on random data shaped like the backbone's output (no forward): the package's
    conversion ``grid.float().cpu().numpy().astype(np.float16)`` against a torch-side cast
    ``grid.to(torch.float16).cpu().numpy()``, the uint8 → float input conversion, and the
    HDF5 write of one batch into one-tile chunks.
    """
    device = settings.device
    batch, side, reps = 8, settings.tile // patch, 5
    grid = torch.randn(batch, embed_dim, side, side, device=device)
    if device.type == "cuda":
        grid = grid.to(torch.bfloat16)  # what autocast hands back on a GPU
    raw = np.random.default_rng(0).integers(0, 256, (batch, settings.tile, settings.tile), dtype=np.uint8)

    def timeit(fn: Callable[[], Any]) -> list[float]:
        fn()
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return times

    package = timeit(lambda: grid.float().cpu().numpy().astype(np.float16))
    torch_cast = timeit(lambda: grid.to(torch.float16).cpu().numpy())
    unit = timeit(lambda: to_unit_float(raw).to(device))
    path = root / "write-probe.h5"
    with h5py.File(path, "w") as handle:
        tokens = handle.create_dataset("t", shape=(batch * (reps + 1), embed_dim, side, side), dtype=np.float16, chunks=(1, embed_dim, side, side))
        block = grid.to(torch.float16).cpu().numpy()
        counter = iter(range(reps + 1))

        def write() -> None:
            i = next(counter)
            tokens[i * batch : (i + 1) * batch] = block

        write_times = timeit(write)
    path.unlink()
    note = f"batch {batch}, grid ({embed_dim},{side},{side}), {'bf16 on GPU' if device.type == 'cuda' else 'fp32 on CPU'}; load1 {load1():.2f}"
    table.add("cache_overhead", label, "fp16 conversion as in features.py (.float().cpu().numpy().astype)", median(package), "s/batch", reps, note)
    table.add("cache_overhead", label, "fp16 conversion in torch (.to(float16).cpu().numpy())", median(torch_cast), "s/batch", reps, "the suggested fix; same values")
    table.add("cache_overhead", label, "uint8 -> float input (to_unit_float + .to(device))", median(unit), "s/batch", reps, note)
    table.add("cache_overhead", label, "HDF5 write of one batch (one-tile chunks)", median(write_times), "s/batch", reps, note)


# --------------------------------------------------------------------------- 1: head training


class OnlineFrozenSegmenter(nn.Module):
    """The published way: the frozen backbone runs for every batch under no_grad, then the head."""

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(0)
        self.segmenter = CachedFeatureSegmenter(backbone.embed_dim, width, backbone.patch_size)

    def forward(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        with torch.no_grad():
            grid = self.backbone(images).grid
        return self.segmenter(grid, out_size)

    def train(self, mode: bool = True) -> "OnlineFrozenSegmenter":
        super().train(mode)
        self.backbone.eval()
        return self


def head_model(in_channels: int, width: int, patch: int) -> CachedFeatureSegmenter:
    torch.manual_seed(0)  # the same initial head in every variant
    return CachedFeatureSegmenter(in_channels, width, patch)


class FitEpochs:
    """One more epoch of the real ``fit()`` per call, resuming from its own checkpoint.

    The trainer's resume path (model, optimiser, RNG and early-stopping state from the
    per-epoch checkpoint) lets the variants' epochs interleave, so that a change in the
    machine's load hits all of them alike. Per-epoch seconds are fit's own history entry
    (training batches + validation); the resume itself happens outside it.
    """

    def __init__(self, settings: Settings, model: nn.Module, train: Any, val: Any, root: Path, name: str) -> None:
        self.settings, self.model, self.train, self.val, self.name = settings, model, train, val, name
        self.checkpoint = root / f"{name}.checkpoint.pt"
        self.checkpoint.unlink(missing_ok=True)
        self.generator = torch.Generator().manual_seed(0)
        self.done = 0
        self.wall = 0.0

    def epoch(self) -> float:
        self.done += 1
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # "resumed from ..." every call
            result = fit(self.model, self.train, self.val, training_config(self.settings, self.done), self.generator,
                         self.settings.device, self.checkpoint, self.name)
        self.wall += time.perf_counter() - started
        if len(result.history) != self.done:
            raise RuntimeError(f"{self.name}: fit ran {len(result.history)} epochs, expected {self.done}")
        return float(result.history["seconds"].iloc[-1])


class FloorEpochs:
    """Head step only, on float32 tokens already on the device: same order, optimiser, clipping."""

    def __init__(self, settings: Settings, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        self.settings, self.model, self.tokens, self.labels = settings, model.to(settings.device), tokens, labels
        training = training_config(settings, 1)
        self.grad_clip = training["grad_clip"]
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=training["lr"], weight_decay=training["weight_decay"])
        self.generator = torch.Generator().manual_seed(0)
        self.sources = np.zeros(len(labels), dtype=object)
        self.steps: list[float] = []  # per step; exact on CPU (on a GPU see isolated_steps)

    def epoch(self) -> float:
        device, out_size = self.settings.device, tuple(self.labels.shape[-2:])
        self.model.train()
        steps = []
        sync(device)
        started = time.perf_counter()
        for batch in epoch_batches(self.sources, self.settings.batch_size, self.generator, False):
            t0 = time.perf_counter()
            index = torch.from_numpy(batch).to(device)
            loss = soft_dice_loss(self.model(self.tokens[index], out_size), self.labels[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
            self.optimizer.step()
            steps.append(time.perf_counter() - t0)
        sync(device)
        self.last_steps = steps
        return time.perf_counter() - started


def isolated_steps(settings: Settings, backbone: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Backbone forward (no_grad) and head step at the training batch size, each timed alone."""
    device, bs = settings.device, settings.batch_size
    images = torch.rand(bs, 1, settings.tile, settings.tile, device=device)
    model = head_model(tokens.shape[1], settings.head_width, backbone.patch_size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=1e-4)
    out_size = tuple(labels.shape[-2:])

    def head_step() -> None:
        loss = soft_dice_loss(model(tokens[:bs], out_size), labels[:bs])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            backbone(images)

    result = []
    for fn in (forward, head_step):
        fn()
        times = []
        for _ in range(settings.step_repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        result.append(times)
    return result[0], result[1]


def bench_training(settings: Settings, table: Table, label: str, backbone: nn.Module, tiles: Path, split: Path, cache: Path, root: Path, forward_per_batch: list[float]) -> None:
    device = settings.device
    datasets, files = ["bench"], {"bench": str(tiles)}
    r = settings.epochs

    # cached: the real path (tokens read from the cache by load_training_data, then fit)
    t0 = time.perf_counter()
    train, val, _ = load_training_data("head", datasets, files, {"bench": str(cache)}, {"bench": str(split)})
    read_seconds = time.perf_counter() - t0
    # floor: float32 tensors already on the device, the bare head step
    tokens = torch.from_numpy(train.inputs.astype(np.float32)).to(device)
    labels = torch.from_numpy(train.labels).to(device)
    # online: the published way, the frozen backbone run under no_grad for every batch
    online_train, online_val, _ = load_training_data("online", datasets, files, None, {"bench": str(split)})
    backbone = backbone.to(device)
    in_channels, patch = train.inputs.shape[1], backbone.patch_size
    variants = {
        "cached": FitEpochs(settings, head_model(in_channels, settings.head_width, patch), train, val, root, "cached"),
        "floor": FloorEpochs(settings, head_model(in_channels, settings.head_width, patch), tokens, labels),
        "online": FitEpochs(settings, OnlineFrozenSegmenter(backbone, settings.head_width), online_train, online_val, root, "online"),
    }
    memories = {name: PeakMemory(device) for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    loads: dict[str, list[float]] = {name: [] for name in variants}
    floor_steps: list[float] = []
    names = list(variants)
    for epoch in range(settings.warmup_epochs + settings.epochs):
        order = names[epoch % 3 :] + names[: epoch % 3]  # rotate who goes first
        for name in order:
            load = load1()
            with memories[name]:
                value = variants[name].epoch()
            if epoch >= settings.warmup_epochs:
                seconds[name].append(value)
                loads[name].append(load)
                if name == "floor":
                    floor_steps += variants["floor"].last_steps
    cached, floor, online = seconds["cached"], seconds["floor"], seconds["online"]
    memory_cached, memory_floor, memory_online = memories["cached"], memories["floor"], memories["online"]
    cached_wall, online_wall = variants["cached"].wall, variants["online"].wall
    load_cached, load_floor, load_online = (f"{min(loads[n]):.2f}-{max(loads[n]):.2f}" for n in names)

    n = len(train)
    setting = f"{n} tiles/epoch, batch {settings.batch_size}, head width {settings.head_width}, {device.type}"
    note = f"fit() history seconds, after {settings.warmup_epochs} warm-up epoch(s), epochs interleaved with the other variants"
    table.add("head_training", label, f"cached tokens via fit(), {setting}", median(cached), "s/epoch", r, f"{note}; {spread(cached)}; fit wall {cached_wall:.1f} s incl. warm-up, resumes, checkpoints; load1 {load_cached}")
    table.add("head_training", label, f"floor: head step on in-memory tensors, {setting}", median(floor), "s/epoch", r, f"no fit(), no cache; {spread(floor)}; load1 {load_floor}")
    table.add("head_training", label, f"online frozen backbone every batch via fit(), {setting}", median(online), "s/epoch", r, f"{note}; {spread(online)}; fit wall {online_wall:.1f} s incl. warm-up, resumes, checkpoints; load1 {load_online}")
    table.add("head_training", label, "cache read once per run (load_training_data, head)", read_seconds, "s", 1, "not per epoch: amortised over all epochs of a run")
    table.add("head_training", label, "ratio online / cached (per epoch)", median(online) / median(cached), "x", r, "target >= 3.5 for ViT-L/14")
    table.add("head_training", label, "ratio cached / floor (per epoch)", median(cached) / median(floor), "x", r, "target <= 1.10")

    if device.type == "cuda" or settings.cache_batch_size != settings.batch_size:
        forward_times, head_times = isolated_steps(settings, backbone, tokens, labels)
        how = f"isolated loops, {settings.step_repeats} repeats each"
    else:  # on CPU the bare forward loop ran at the training batch size and the floor's steps are exact
        forward_times, head_times = forward_per_batch, floor_steps
        how = "backbone: bare forward_features batches of the caching benchmark; head: the floor's steps"
    bound = (median(forward_times) + median(head_times)) / median(head_times)
    table.add("compute_bound", label, f"backbone forward, batch {settings.batch_size} (no_grad)", median(forward_times), "s/batch", len(forward_times), how)
    table.add("compute_bound", label, f"head fwd+bwd+AdamW step, batch {settings.batch_size}", median(head_times), "s/batch", len(head_times), how)
    table.add("compute_bound", label, "ratio (backbone fwd + head step) / head step", bound, "x", min(len(forward_times), len(head_times)), "upper limit of online/cached")

    for stage, memory in (("head training, cached (fit)", memory_cached), ("head training, floor", memory_floor), ("head training, online (fit)", memory_online)):
        table.add("memory", label, f"peak RSS, {stage}", memory.peak_mib, "MiB", 1, memory.note())
        if memory.gpu_mib is not None:
            table.add("gpu", label, f"peak GPU memory allocated, {stage}", memory.gpu_mib, "MiB", 1, "torch.cuda.max_memory_allocated")


# --------------------------------------------------------------------------- 3: cache size


def cache_bytes(n_tiles: int, n_images: int, embed_dim: int, side: int) -> int:
    """Bytes of the arrays cache_features writes: fp16 tokens + fp32 tile_pooled + fp32 pooled."""
    return n_tiles * embed_dim * side * side * 2 + n_tiles * embed_dim * 4 + n_images * embed_dim * 4


def bench_cache_size(settings: Settings, table: Table, label: str, cache: Path, embed_dim: int, patch: int) -> None:
    with h5py.File(cache, "r") as handle:
        n_tiles = int(handle["train"]["tokens"].shape[0])
        n_images = int(handle["train"]["pooled"].shape[0])
    side = settings.tile // patch
    size = cache.stat().st_size
    expected = cache_bytes(n_tiles, n_images, embed_dim, side)
    table.add("cache_size", label, f"measured HDF5 file, {n_tiles} tiles of {settings.tile}px (C={embed_dim}, {side}x{side} grid)", size / 2**20, "MiB", 1, f"{size / n_tiles / 2**20:.3f} MiB/tile")
    table.add("cache_size", label, "measured / array bytes (HDF5 overhead factor)", size / expected, "x", 1, "extrapolations below use the array bytes")


def bench_cache_extrapolation(settings: Settings, table: Table, patch: int = 14) -> None:
    side = settings.tile // patch
    for dataset, n_images, height, width in REAL_DATASETS:
        per_image = len(TileGrid.for_shape(height, width, settings.tile, settings.overlap).positions)
        n_tiles = n_images * per_image
        for name, dim in VIT_DIMS.items():
            size = cache_bytes(n_tiles, n_images, dim, side)
            table.add("cache_size", f"{name}/{patch}", f"{dataset}: {n_images} slices {height}x{width} -> {n_tiles} tiles ({per_image}/slice), C={dim}",
                      size / 2**30, "GiB", 1, f"extrapolated, fp16 tokens, tile {settings.tile} overlap {settings.overlap}; train split is loaded into RAM by head training")


# --------------------------------------------------------------------------- 4: dry runs


def large_config() -> dict[str, Any]:
    """About ten times the published grid: 10 seeds, 7 backbones, 4 datasets, 7 training sets."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    vnc = config["datasets"]["vnc"]
    for copy_name in ("vnc2", "vnc3"):
        config["datasets"][copy_name] = copy.deepcopy(vnc)
    config["training_sets"] = {
        "lucchi": ["lucchi"], "vnc": ["vnc"], "vnc2": ["vnc2"], "vnc3": ["vnc3"],
        "paired": ["lucchi", "vnc"], "paired2": ["lucchi", "vnc2"], "paired3": ["lucchi", "vnc3"],
    }
    config["backbones"].update({
        "dinov2S": {"family": "dinov2", "model": "vit_small_patch14_dinov2.lvd142m"},
        "dinov2B": {"family": "dinov2", "model": "vit_base_patch14_dinov2.lvd142m"},
        "dinov2g": {"family": "dinov2", "model": "vit_giant_patch14_dinov2.lvd142m"},
        "dinov3B": {"family": "dinov3", "model": "vit_base_patch16_dinov3.lvd1689m"},
    })
    config["seeds"] = list(range(10))
    return config


def snakemake_exe() -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "snakemake"]


def dry_run(args: list[str], workdir: Path) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run(snakemake_exe() + ["-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n", *args], capture_output=True, text=True, env=env)
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
        label = "default config.yaml" if not extra else "--configfile (10 seeds, 7 backbones, 4 datasets, 7 training sets)"
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
            table.rows.append(dict(benchmark="dry_run", backbone="-", setting=setting, value=float("nan"), unit="s", n_repeats=0, note=f"{DRY_RUN_FAILED}: {last[:300]}"))
            print(f"  dry_run        {setting}: {DRY_RUN_FAILED}: {last}", flush=True)
            continue
        table.add("dry_run", "-", setting, median(times), "s", len(times),
                  f"{counts[name]} jobs; {spread(times)}; first (counting) run {first:.2f} s; load1 {min(loads):.2f}-{max(loads):.2f}" + ("; target < 10 s" if not extra else ""))
        table.add("dry_run", "-", f"jobs in the DAG, {name}", counts[name], "jobs", 1, "incl. download_dataset and fetch_weights (dry run: nothing downloaded)")
    if len(counts) == 2:
        table.add("dry_run", "-", "job ratio 10x grid / published", counts["10x grid"] / counts["published"], "x", 1, "")


# --------------------------------------------------------------------------- 5: GPU only


def bench_gpu_lora(settings: Settings, table: Table) -> None:
    label, spec = VIT_L
    if settings.device.type != "cuda":
        for setting, unit in (("ViT-L caching bf16 throughput (tiles/s)", "tiles/s"), ("ViT-L caching bf16 peak GPU memory", "MiB"),
                              ("LoRA rank 16 training step, batch 2 of 448px, head 512", "s/step"), ("LoRA training step peak GPU memory", "MiB")):
            table.rows.append(dict(benchmark="gpu", backbone=label, setting=setting, value=float("nan"), unit=unit, n_repeats=0, note=NO_GPU))
            print(f"  gpu            {label:<10} {setting:<48} {NO_GPU}", flush=True)
        return
    device = settings.device
    model = build_segmenter("lora", spec, {"width": settings.head_width}, {"rank": 16, "alpha": 32, "dropout": 0.0}).to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=5e-5, weight_decay=1e-4)
    images = torch.rand(settings.batch_size, 1, 448, 448, device=device)
    labels = torch.randint(0, 2, (settings.batch_size, 448, 448), device=device)
    times = []
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(3 + settings.step_repeats):
        sync(device)
        t0 = time.perf_counter()
        loss = soft_dice_loss(model(images, (448, 448)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    note = f"fp32 as fit() runs it (no autocast), {sum(p.numel() for p in parameters)} trainable parameters, {torch.cuda.get_device_name(device)}"
    table.add("gpu", label, "LoRA rank 16 training step, batch 2 of 448px, head 512", median(times), "s/step", len(times), note)
    table.add("gpu", label, "LoRA training step peak GPU memory", peak, "MiB", 1, "torch.cuda.max_memory_allocated")
    del model, optimizer


# --------------------------------------------------------------------------- driver


def run_benchmarks(settings: Settings, workdir: Path | None = None) -> pd.DataFrame:
    table = Table()
    started = time.perf_counter()
    start_load = os.getloadavg()
    print(f"device {settings.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"loadavg {start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}", flush=True)
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
        if settings.dryrun:
            bench_dry_runs(settings, table, root)
        bench_gpu_lora(settings, table)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    end_load = os.getloadavg()
    total = time.perf_counter() - started
    table.add("machine", "-", "loadavg 1/5/15 min at start", start_load[0], "load", 1, f"{start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    table.add("machine", "-", "loadavg 1/5/15 min at end", end_load[0], "load", 1, f"{end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    table.add("machine", "-", "total benchmark time", total, "s", 1, f"device {settings.device.type}; torch {torch.__version__}")
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
