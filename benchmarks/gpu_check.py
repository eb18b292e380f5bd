"""Check a new GPU node before booking the full grid: is the GPU path fast and does it fit?

    python -m benchmarks.gpu_check [--out benchmarks/results-gpu.csv] [--tiles 512]

On a machine with CUDA, in a few minutes, through the package's own code paths:

1. ``cache_features`` over a few hundred random 448² tiles with ViT-L/14 (random weights,
   nothing downloaded) under bf16 autocast: tiles/s, peak GPU memory, and the fraction of
   the GPU's bf16 peak FLOP/s reached. FLOPs are counted from the model
   (``torch.utils.flop_counter`` on one batch, attention through the math kernel so that
   every matmul is seen), not taken from a formula.
2. The published head trained on those cached tokens, held on the GPU: steps/s, peak memory.
3. LoRA steps (rank, alpha, head width and optimiser from ``config.yaml``) on the tiles,
   in float32 as ``fit`` runs them: steps/s, peak memory.

Without CUDA it says so and exits 0. ``--device cpu --precision bf16`` runs the same path
on a CPU (tests use it with a tiny model); its numbers say nothing about a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: keep the table readable

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import COLUMNS, Table  # noqa: F401 (COLUMNS: the table's columns, for callers)
from em_foundation.backbones import build_backbone
from em_foundation.data.prepared import Split, write_prepared
from em_foundation.data.tiles import read_tiles, tile_dataset
from em_foundation.feature_cache import cache_features, read_tokens, to_unit_float
from em_foundation.training.segmenter import CachedFeatureSegmenter, build_segmenter
from em_foundation.training.trainer import make_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: nothing measured (run this on a GPU node; --device cpu runs the path on a CPU)"

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name: more specific names first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A30", 165.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The data-sheet bf16 peak of a GPU by name, or None when it is not in the table."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


@dataclass
class Check:
    """What to measure; defaults are the published ViT-L, head and LoRA settings."""

    device: torch.device
    model: str = "vit_large_patch14_dinov2"
    model_kwargs: dict[str, Any] | None = None
    precision: str = "bf16"
    tile: int = 448
    n_tiles: int = 512
    cache_batch_size: int = 8
    head_steps: int = 300
    lora_steps: int = 50
    warmup_steps: int = 5
    peak_tflops: float | None = None
    head_width: int | None = None  # None: config.yaml's

    def spec(self) -> dict[str, Any]:
        """The backbone entry as a validated config would hold it (random weights: nothing fetched)."""
        return {
            "family": "dinov2",
            "model": self.model,
            "weights": "random",
            "model_kwargs": {"img_size": self.tile, **(self.model_kwargs or {})},
            "layers": [-1],
            "pooling": "mean",
            "normalisation": "family",
            "options": {},
            "revision": None,
        }


def published() -> dict[str, Any]:
    """The head, LoRA and training blocks of config.yaml: what the grid will run."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    return {key: config[key] for key in ("head", "lora", "training")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def forward_flops(backbone: torch.nn.Module, batch: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by torch from the ops the model really runs.

    Attention goes through the math kernel while counting: fused CPU kernels are not in
    torch's FLOP registry, and the math kernel's matmuls carry the same FLOPs.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        backbone(batch)
    return counter.get_total_flops()


def make_tiles(root: Path, n_tiles: int, tile: int, seed: int = 0) -> Path:
    """``n_tiles`` random slices of one tile each, through the real tiling code."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_tiles, tile, tile), dtype=np.uint8)
    labels = (rng.random((n_tiles, tile, tile)) < 0.1).astype(np.uint8)
    prepared = root / "check.h5"
    write_prepared(
        prepared, {"train": Split(raw, labels, [f"slice{i:04d}" for i in range(n_tiles)])}, {"dataset": "gpu_check"}
    )
    tiles = root / "check.tiles.h5"
    tile_dataset(prepared, tiles, view={"mode": "tile", "tile_size": tile, "overlap": 0})
    return tiles


def train_steps(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    training: dict[str, Any],
    steps: int,
    warmup: int,
) -> list[float]:
    """Seconds per step of ``fit``'s step (soft Dice, backward, clip, AdamW) over batches of the inputs."""
    device = inputs.device
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, training)
    batch_size = training["batch_size"]
    times = []
    for step in range(warmup + steps):
        start = step * batch_size % max(len(inputs) - batch_size + 1, 1)
        sync(device)
        started = time.perf_counter()
        loss = train_step(
            model,
            parameters,
            optimizer,
            inputs[start : start + batch_size],
            labels[start : start + batch_size],
            training["grad_clip"],
        )
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the check's training loss is {loss.item()}: the GPU path is broken")
    return times


def run_check(check: Check, root: Path) -> pd.DataFrame:
    device = check.device
    settings = published()
    if check.head_width:
        settings["head"]["width"] = check.head_width
    table = Table()
    label = check.model
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"

    def add(benchmark: str, setting: str, value: float, unit: str, n: int, note: str = "") -> None:
        table.add(benchmark, label, setting, value, unit, n, note)

    def add_steps(benchmark: str, setting: str, times: list[float], note: str) -> None:
        """Median steps/s of a training stage and the peak GPU memory it reached."""
        add(benchmark, setting, 1 / statistics.median(times), "steps/s", len(times), note)
        add(benchmark, "peak GPU memory", peak_mib(device), "MiB", 1, "torch.cuda.max_memory_allocated")

    print(
        f"gpu_check on {name}, torch {torch.__version__}, {check.model} ({check.precision}), {check.n_tiles} tiles of {check.tile}²",
        flush=True,
    )
    add("setup", "tile side", check.tile, "px", 1, "square tiles; every step below is on tiles of this size")
    add(
        "setup",
        "training batch size",
        settings["training"]["batch_size"],
        "tiles",
        1,
        "config.yaml training.batch_size",
    )
    tiles = make_tiles(root, check.n_tiles, check.tile)
    backbone = build_backbone(check.spec()).to(device)

    # 1. caching: one warm-up pass over a few tiles (kernel selection, allocator), then the real run
    warm = to_unit_float(read_tiles(tiles, "train").raw[: check.cache_batch_size], device)
    flops_per_tile = forward_flops(backbone, warm[:1])
    cache = root / "features.h5"
    cache_features(backbone, tiles, root / "warmup.h5", check.cache_batch_size, device, {}, precision=check.precision)
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    cache_features(backbone, tiles, cache, check.cache_batch_size, device, {}, precision=check.precision)
    sync(device)
    seconds = time.perf_counter() - started
    tiles_per_s = check.n_tiles / seconds
    achieved = flops_per_tile * tiles_per_s
    peak = check.peak_tflops or (bf16_peak_tflops(name) if device.type == "cuda" else None)
    add(
        "caching",
        f"cache_features {check.precision} throughput",
        tiles_per_s,
        "tiles/s",
        1,
        f"{check.n_tiles} tiles, batch {check.cache_batch_size}, {seconds:.2f} s incl. tile reads and HDF5 writes; {name}",
    )
    add("caching", "forward FLOPs per tile", flops_per_tile / 1e9, "GFLOP", 1, "torch.utils.flop_counter, one tile")
    add("caching", "achieved FLOP/s", achieved / 1e12, "TFLOP/s", 1, "FLOPs per tile x tiles/s")
    add(
        "caching",
        "fraction of bf16 peak FLOP/s",
        achieved / (peak * 1e12) if peak else float("nan"),
        "fraction",
        1,
        f"peak {peak} TFLOP/s" + (" (given)" if check.peak_tflops else " (data sheet)")
        if peak
        else "peak unknown for this device: pass --peak-tflops",
    )
    add("caching", "peak GPU memory", peak_mib(device), "MiB", 1, "torch.cuda.max_memory_allocated")

    # 2. the published head on cached tokens held on the device
    data = read_tiles(tiles, "train")
    labels = torch.from_numpy(data.labels.astype(np.int64)).to(device)
    tokens = torch.from_numpy(read_tokens(cache, "train")).to(device)
    torch.manual_seed(0)
    head = CachedFeatureSegmenter(backbone.embed_dim, settings["head"]["width"], backbone.patch_size).to(device)
    reset_peak(device)
    times = train_steps(head, tokens, labels, settings["training"], check.head_steps, check.warmup_steps)
    add_steps(
        "head",
        f"head training steps (width {settings['head']['width']}, batch {settings['training']['batch_size']})",
        times,
        f"tokens resident on the device ({tokens.numel() * 2 / 2**20:.0f} MiB float16); fp32 as fit runs it",
    )
    del head, tokens, backbone

    # 3. LoRA on the tiles' pixels, float32 as fit runs it
    lora = settings["lora"]
    model = build_segmenter("lora", check.spec(), settings["head"], lora).to(device)
    images = to_unit_float(data.raw[: 8 * settings["training"]["batch_size"]], device)
    reset_peak(device)
    times = train_steps(
        model, images, labels[: len(images)], settings["training"], check.lora_steps, check.warmup_steps
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    add_steps(
        "lora",
        f"LoRA rank {lora['rank']} training steps (batch {settings['training']['batch_size']})",
        times,
        f"{trainable} trainable parameters; fp32 as fit runs it",
    )
    return table.frame()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-gpu.csv")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to run the path without a GPU")
    parser.add_argument("--model", default=Check.model, help="a timm DINOv2 architecture (random weights)")
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=None,
        help='JSON, e.g. \'{"depth": 2, "embed_dim": 64, "num_heads": 2}\'',
    )
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=Check.precision)
    parser.add_argument("--tile", type=int, default=Check.tile)
    parser.add_argument("--tiles", type=int, default=Check.n_tiles)
    parser.add_argument("--head-steps", type=int, default=Check.head_steps)
    parser.add_argument("--lora-steps", type=int, default=Check.lora_steps)
    parser.add_argument("--warmup-steps", type=int, default=Check.warmup_steps)
    parser.add_argument("--head-width", type=int, help="head width (default: config.yaml's)")
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, where the data-sheet table lacks it"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    check = Check(
        device=torch.device(args.device),
        model=args.model,
        model_kwargs=args.model_kwargs,
        precision=args.precision,
        tile=args.tile,
        n_tiles=args.tiles,
        head_steps=args.head_steps,
        lora_steps=args.lora_steps,
        warmup_steps=args.warmup_steps,
        peak_tflops=args.peak_tflops,
        head_width=args.head_width,
    )
    with tempfile.TemporaryDirectory(prefix="em-gpu-check-") as root:
        started = time.perf_counter()
        frame = run_check(check, Path(root))
    print(f"\n{frame.to_markdown(index=False, floatfmt='.4g')}\n\ntotal {time.perf_counter() - started:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, args.out)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
