"""benchmarks.gpu_check: the GPU path a new cluster is checked with, run for real on a CPU."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import torch
from conftest import REPO_ROOT as REPO

from benchmarks import gpu_check
from em_foundation.backbones import build_backbone
from em_foundation.feature_cache import cache_features, read_tokens

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def tiny_check(**overrides) -> gpu_check.Check:
    fields = dict(
        device=torch.device("cpu"),
        model="vit_small_patch14_dinov2",
        model_kwargs=TINY,
        tile=56,
        n_tiles=6,
        head_steps=2,
        lora_steps=2,
        warmup_steps=1,
        head_width=16,
    )
    return gpu_check.Check(**{**fields, **overrides})


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu.csv"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert gpu_check.NO_CUDA in result.stdout
    assert not out.exists()


def test_flops_are_counted_from_the_model():
    """Counted FLOPs equal a ViT's by hand: patch embedding, then per block 24·N·D² + 4·N²·D."""
    check = tiny_check()
    backbone = build_backbone(check.spec())
    counted = gpu_check.forward_flops(backbone, torch.rand(1, 1, 56, 56))
    n, d, depth, patch = (56 // 14) ** 2 + 1, TINY["embed_dim"], TINY["depth"], 14
    by_hand = 2 * (n - 1) * 3 * patch * patch * d + depth * (24 * n * d * d + 4 * n * n * d)
    assert counted == by_hand
    # and it scales with the batch
    assert gpu_check.forward_flops(backbone, torch.rand(2, 1, 56, 56)) == 2 * counted


def test_bf16_caching_path_runs_under_cpu_autocast(tmp_path):
    """precision='bf16' really autocasts (tokens differ from float32 at bf16's resolution)."""
    check = tiny_check()
    tiles = gpu_check.make_tiles(tmp_path, 4, 56)
    backbone = build_backbone(check.spec())
    cache_features(backbone, tiles, tmp_path / "bf16.h5", 4, torch.device("cpu"), {}, precision="bf16")
    cache_features(backbone, tiles, tmp_path / "fp32.h5", 4, torch.device("cpu"), {}, precision="fp32")
    bf16, fp32 = (
        read_tokens(tmp_path / "bf16.h5", "train").astype(np.float32),
        read_tokens(tmp_path / "fp32.h5", "train").astype(np.float32),
    )
    assert not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, atol=0.15 * float(np.abs(fp32).max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backbone.model.blocks[0].attn.qkv(torch.rand(1, TINY["embed_dim"])).dtype == torch.bfloat16


def test_check_on_cpu_reports_every_row(tmp_path):
    frame = gpu_check.run_check(tiny_check(), tmp_path)
    assert list(frame.columns) == gpu_check.COLUMNS
    values = {(row.benchmark, row.unit): row.value for row in frame.itertuples()}
    assert values[("caching", "tiles/s")] > 0
    assert values[("head", "steps/s")] > 0 and values[("lora", "steps/s")] > 0
    assert np.isnan(values[("caching", "fraction")])  # no data-sheet peak for a CPU
    lora = frame[(frame.benchmark == "lora") & (frame.unit == "steps/s")].iloc[0]
    assert lora.n_repeats == 2


def test_main_writes_the_table(tmp_path):
    out = tmp_path / "gpu.csv"
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--model",
            "vit_small_patch14_dinov2",
            "--model-kwargs",
            '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
            "--tile",
            "28",
            "--tiles",
            "4",
            "--head-steps",
            "1",
            "--lora-steps",
            "1",
            "--warmup-steps",
            "0",
            "--head-width",
            "8",
            "--peak-tflops",
            "1.0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    frame = pd.read_csv(out)
    fraction = frame[frame.unit == "fraction"].value.iloc[0]
    achieved = frame[frame.unit == "TFLOP/s"].value.iloc[0]
    assert fraction == achieved / 1.0


def test_data_sheet_peaks_match_the_most_specific_name():
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.bf16_peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_check.bf16_peak_tflops("NVIDIA L4") == 121.0
    assert gpu_check.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.bf16_peak_tflops("NVIDIA A10") == 125.0
    assert gpu_check.bf16_peak_tflops("Some Future GPU") is None
