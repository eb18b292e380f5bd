"""GPU only: the LoRA training step of ViT-L (time and peak memory)."""

from __future__ import annotations

import time

import torch

from benchmarks.common import NO_GPU, VIT_L, Settings, Table, lora_config, median, sync, training_config
from em_foundation.training.segmenter import build_segmenter
from em_foundation.training.trainer import make_optimizer, train_step


def bench_gpu_lora(settings: Settings, table: Table) -> None:
    label, spec = VIT_L
    lora, training, side = lora_config(), training_config(settings, 1), settings.tile
    step = (
        f"LoRA rank {lora['rank']} training step, batch {settings.batch_size} of {side}px, head {settings.head_width}"
    )
    if settings.device.type != "cuda":
        for setting, unit in (
            ("ViT-L caching bf16 throughput (tiles/s)", "tiles/s"),
            ("ViT-L caching bf16 peak GPU memory", "MiB"),
            (step, "s/step"),
            ("LoRA training step peak GPU memory", "MiB"),
        ):
            table.rows.append(
                dict(
                    benchmark="gpu",
                    backbone=label,
                    setting=setting,
                    value=float("nan"),
                    unit=unit,
                    n_repeats=0,
                    note=NO_GPU,
                )
            )
            print(f"  gpu            {label:<10} {setting:<48} {NO_GPU}", flush=True)
        return
    device = settings.device
    model = build_segmenter("lora", spec, {"width": settings.head_width}, lora).to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, training)
    images = torch.rand(settings.batch_size, 1, side, side, device=device)
    labels = torch.randint(0, 2, (settings.batch_size, side, side), device=device)
    times = []
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(3 + settings.step_repeats):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, parameters, optimizer, images, labels, training["grad_clip"])
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    note = f"fp32 as fit() runs it (no autocast), {sum(p.numel() for p in parameters)} trainable parameters, {torch.cuda.get_device_name(device)}"
    table.add("gpu", label, step, median(times), "s/step", len(times), note)
    table.add("gpu", label, "LoRA training step peak GPU memory", peak, "MiB", 1, "torch.cuda.max_memory_allocated")
    del model, optimizer
