"""Head training per epoch: cached tokens through ``fit``, the frozen backbone online, and the
bare head step (floor); and the compute bound of online over cached."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import PeakMemory, Settings, Table, load1, median, spread, sync, training_config
from em_foundation.training.run import load_training_data
from em_foundation.training.sampling import epoch_batches
from em_foundation.training.segmenter import CachedFeatureSegmenter
from em_foundation.training.trainer import fit, make_optimizer, train_step


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
            result = fit(
                self.model,
                self.train,
                self.val,
                training_config(self.settings, self.done),
                self.generator,
                self.settings.device,
                self.checkpoint,
                self.name,
            )
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
        self.optimizer = make_optimizer(self.parameters, training)
        self.generator = torch.Generator().manual_seed(0)
        self.sources = np.zeros(len(labels), dtype=object)
        self.steps: list[float] = []  # per step; exact on CPU (on a GPU see isolated_steps)

    def epoch(self) -> float:
        device = self.settings.device
        self.model.train()
        steps = []
        sync(device)
        started = time.perf_counter()
        for batch in epoch_batches(self.sources, self.settings.batch_size, self.generator, False):
            t0 = time.perf_counter()
            index = torch.from_numpy(batch).to(device)
            train_step(
                self.model, self.parameters, self.optimizer, self.tokens[index], self.labels[index], self.grad_clip
            )
            steps.append(time.perf_counter() - t0)
        sync(device)
        self.last_steps = steps
        return time.perf_counter() - started


def isolated_steps(
    settings: Settings, backbone: nn.Module, tokens: torch.Tensor, labels: torch.Tensor
) -> tuple[list[float], list[float]]:
    """Backbone forward (no_grad) and head step at the training batch size, each timed alone."""
    device, bs = settings.device, settings.batch_size
    images = torch.rand(bs, 1, settings.tile, settings.tile, device=device)
    model = head_model(tokens.shape[1], settings.head_width, backbone.patch_size).to(device).train()
    training = training_config(settings, 1)
    parameters = list(model.parameters())
    optimizer = make_optimizer(parameters, training)

    def head_step() -> None:
        train_step(model, parameters, optimizer, tokens[:bs], labels[:bs], training["grad_clip"])

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


def bench_training(
    settings: Settings,
    table: Table,
    label: str,
    backbone: nn.Module,
    tiles: Path,
    split: Path,
    cache: Path,
    root: Path,
    forward_per_batch: list[float],
) -> None:
    device = settings.device
    datasets, files = ["bench"], {"bench": str(tiles)}
    r = settings.epochs

    # cached: the real path (tokens read from the cache by load_training_data, then fit)
    t0 = time.perf_counter()
    # read whole (as a split that fits in memory is): the floor below takes its arrays
    train, val, _ = load_training_data(
        "head", datasets, files, {"bench": str(cache)}, {"bench": str(split)}, data_in_memory="always"
    )
    read_seconds = time.perf_counter() - t0
    # floor: float32 tensors already on the device, the bare head step
    tokens = torch.from_numpy(train.inputs.astype(np.float32)).to(device)
    labels = torch.from_numpy(train.labels).to(device)
    # online: the published way, the frozen backbone run under no_grad for every batch
    online_train, online_val, _ = load_training_data(
        "online", datasets, files, None, {"bench": str(split)}, data_in_memory="always"
    )
    backbone = backbone.to(device)
    in_channels, patch = train.inputs.shape[1], backbone.patch_size
    variants = {
        "cached": FitEpochs(settings, head_model(in_channels, settings.head_width, patch), train, val, root, "cached"),
        "floor": FloorEpochs(settings, head_model(in_channels, settings.head_width, patch), tokens, labels),
        "online": FitEpochs(
            settings, OnlineFrozenSegmenter(backbone, settings.head_width), online_train, online_val, root, "online"
        ),
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
    table.add(
        "head_training",
        label,
        f"cached tokens via fit(), {setting}",
        median(cached),
        "s/epoch",
        r,
        f"{note}; {spread(cached)}; fit wall {cached_wall:.1f} s incl. warm-up, resumes, checkpoints; load1 {load_cached}",
    )
    table.add(
        "head_training",
        label,
        f"floor: head step on in-memory tensors, {setting}",
        median(floor),
        "s/epoch",
        r,
        f"no fit(), no cache; {spread(floor)}; load1 {load_floor}",
    )
    table.add(
        "head_training",
        label,
        f"online frozen backbone every batch via fit(), {setting}",
        median(online),
        "s/epoch",
        r,
        f"{note}; {spread(online)}; fit wall {online_wall:.1f} s incl. warm-up, resumes, checkpoints; load1 {load_online}",
    )
    table.add(
        "head_training",
        label,
        "cache read once per run (load_training_data, head)",
        read_seconds,
        "s",
        1,
        "not per epoch: amortised over all epochs of a run",
    )
    table.add(
        "head_training",
        label,
        "ratio online / cached (per epoch)",
        median(online) / median(cached),
        "x",
        r,
        "target >= 3.5 for ViT-L/14",
    )
    table.add(
        "head_training",
        label,
        "ratio cached / floor (per epoch)",
        median(cached) / median(floor),
        "x",
        r,
        "target <= 1.10",
    )

    if device.type == "cuda" or settings.cache_batch_size != settings.batch_size:
        forward_times, head_times = isolated_steps(settings, backbone, tokens, labels)
        how = f"isolated loops, {settings.step_repeats} repeats each"
    else:  # on CPU the bare forward loop ran at the training batch size and the floor's steps are exact
        forward_times, head_times = forward_per_batch, floor_steps
        how = "backbone: bare forward_features batches of the caching benchmark; head: the floor's steps"
    bound = (median(forward_times) + median(head_times)) / median(head_times)
    table.add(
        "compute_bound",
        label,
        f"backbone forward, batch {settings.batch_size} (no_grad)",
        median(forward_times),
        "s/batch",
        len(forward_times),
        how,
    )
    table.add(
        "compute_bound",
        label,
        f"head fwd+bwd+AdamW step, batch {settings.batch_size}",
        median(head_times),
        "s/batch",
        len(head_times),
        how,
    )
    table.add(
        "compute_bound",
        label,
        "ratio (backbone fwd + head step) / head step",
        bound,
        "x",
        min(len(forward_times), len(head_times)),
        "upper limit of online/cached",
    )

    for stage, memory in (
        ("head training, cached (fit)", memory_cached),
        ("head training, floor", memory_floor),
        ("head training, online (fit)", memory_online),
    ):
        table.add("memory", label, f"peak RSS, {stage}", memory.peak_mib, "MiB", 1, memory.note())
        if memory.gpu_mib is not None:
            table.add(
                "gpu",
                label,
                f"peak GPU memory allocated, {stage}",
                memory.gpu_mib,
                "MiB",
                1,
                "torch.cuda.max_memory_allocated",
            )
