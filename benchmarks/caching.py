"""Caching: ``cache_features`` against a bare forward loop, and its per-batch overhead."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch import nn

from benchmarks.common import PeakMemory, Settings, Table, load1, median, spread, sync
from em_foundation.data.tiles import read_tiles
from em_foundation.feature_cache import cache_features, to_unit_float


def bench_caching(
    settings: Settings, table: Table, label: str, backbone: nn.Module, tiles: Path, root: Path
) -> tuple[Path, list[float]]:
    """cache_features against a bare forward_features loop over the same tensors."""
    device = settings.device
    backbone = backbone.to(device).eval()
    raw = read_tiles(tiles, "train").raw
    n, bs = len(raw), settings.cache_batch_size
    with torch.inference_mode():
        inputs = backbone.normalise(to_unit_float(raw).to(device))
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with autocast:
            backbone.model.forward_features(inputs[: bs if device.type == "cuda" else 1])  # warm-up, untimed
    sync(device)

    def bare() -> tuple[float, list[float]]:
        per_batch = []
        with (
            torch.inference_mode(),
            (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda"
                else torch.autocast("cpu", enabled=False)
            ),
        ):
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
                    cache_features(
                        backbone,
                        tiles,
                        cache_path,
                        bs,
                        device,
                        {"backbone": label, "tile": settings.tile, "overlap": settings.overlap},
                    )
                    sync(device)
                    cache_times.append(time.perf_counter() - started)
    r = settings.cache_repeats
    load = f"load1 {min(loads):.2f}-{max(loads):.2f}"
    cache_tps, bare_tps = n / median(cache_times), n / median(bare_times)
    setting = f"{n} tiles {settings.tile}px, batch {bs}, {device.type}{' bf16' if device.type == 'cuda' else ' fp32'}"
    table.add(
        "caching",
        label,
        f"cache_features, {setting}",
        cache_tps,
        "tiles/s",
        r,
        f"median; s {spread(cache_times)}; {load}",
    )
    table.add(
        "caching",
        label,
        f"bare forward_features loop, {setting}",
        bare_tps,
        "tiles/s",
        r,
        f"the limit; s {spread(bare_times)}; {load}",
    )
    table.add(
        "caching",
        label,
        "ratio cache_features / bare loop (throughput)",
        cache_tps / bare_tps,
        "x",
        r,
        "target >= 0.85 (within 15 %)",
    )
    table.add("memory", label, "peak RSS, caching stage (cache_features)", memory.peak_mib, "MiB", 1, memory.note())
    if memory.gpu_mib is not None:
        table.add(
            "gpu",
            label,
            f"peak GPU memory allocated, caching (bf16, batch {bs})",
            memory.gpu_mib,
            "MiB",
            1,
            "torch.cuda.max_memory_allocated",
        )
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
        tokens = handle.create_dataset(
            "t", shape=(batch * (reps + 1), embed_dim, side, side), dtype=np.float16, chunks=(1, embed_dim, side, side)
        )
        block = grid.to(torch.float16).cpu().numpy()
        counter = iter(range(reps + 1))

        def write() -> None:
            i = next(counter)
            tokens[i * batch : (i + 1) * batch] = block

        write_times = timeit(write)
    path.unlink()
    note = f"batch {batch}, grid ({embed_dim},{side},{side}), {'bf16 on GPU' if device.type == 'cuda' else 'fp32 on CPU'}; load1 {load1():.2f}"
    table.add(
        "cache_overhead",
        label,
        "fp16 conversion as in features.py (.float().cpu().numpy().astype)",
        median(package),
        "s/batch",
        reps,
        note,
    )
    table.add(
        "cache_overhead",
        label,
        "fp16 conversion in torch (.to(float16).cpu().numpy())",
        median(torch_cast),
        "s/batch",
        reps,
        "the suggested fix; same values",
    )
    table.add(
        "cache_overhead",
        label,
        "uint8 -> float input (to_unit_float + .to(device))",
        median(unit),
        "s/batch",
        reps,
        note,
    )
    table.add(
        "cache_overhead", label, "HDF5 write of one batch (one-tile chunks)", median(write_times), "s/batch", reps, note
    )
