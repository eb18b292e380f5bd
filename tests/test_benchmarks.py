"""Smoke test of the benchmark suite (benchmarks/run.py) in a tiny configuration.

Not a timed test: it checks that every benchmark runs on the real code paths and that the
table has the expected rows, columns and positive numbers; it asserts nothing about speed.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from benchmarks.run import COLUMNS, DRY_RUN_FAILED, NO_GPU, Settings, run_benchmarks, vit_spec

TINY = ("tinyViT", vit_spec("vit_small_patch14_dinov2", tile=112, depth=2, embed_dim=64, num_heads=2))


def test_benchmark_table_has_every_row(tmp_path):
    settings = Settings(
        backbones=[TINY],
        device=torch.device("cpu"),
        tile=112,
        overlap=16,
        n_tiles=2,
        warmup_epochs=0,
        epochs=1,
        head_width=16,
        batch_size=2,
        cache_batch_size=2,
        cache_repeats=1,
        step_repeats=1,
        dryrun=True,
        large_grid=False,
        dryrun_repeats=0,
        pixelforest_slices=(2, 1),
        pixelforest_shape=(64, 96),
        pixelforest_threads=1,
    )
    table = run_benchmarks(settings, workdir=tmp_path)

    assert list(table.columns) == COLUMNS
    # GPU rows on a CPU machine, and a dry run of a workflow that is itself broken (other
    # tests cover the DAG), are reported as not measured, with the reason, instead of numbers.
    unmeasured = (table["note"] == NO_GPU) | table["note"].str.startswith(DRY_RUN_FAILED)
    assert table.loc[unmeasured, "value"].isna().all()
    measured = table[~unmeasured]
    assert (measured["value"] > 0).all(), measured[~(measured["value"] > 0)]
    assert measured["value"].map(math.isfinite).all()

    def has(benchmark: str, setting_start: str, backbone: str | None = None) -> bool:
        rows = table[(table["benchmark"] == benchmark) & table["setting"].str.startswith(setting_start)]
        if backbone is not None:
            rows = rows[rows["backbone"] == backbone]
        return len(rows) == 1

    for setting in (
        "cached tokens via fit()",
        "floor:",
        "online frozen backbone",
        "cache read once",
        "ratio online / cached",
        "ratio cached / floor",
    ):
        assert has("head_training", setting, "tinyViT"), setting
    for setting in ("backbone forward", "head fwd+bwd", "ratio (backbone fwd"):
        assert has("compute_bound", setting, "tinyViT"), setting
    for setting in ("cache_features,", "bare forward_features loop", "ratio cache_features / bare loop"):
        assert has("caching", setting, "tinyViT"), setting
    for setting in ("fp16 conversion as in features.py", "fp16 conversion in torch", "uint8 -> float", "HDF5 write"):
        assert has("cache_overhead", setting, "tinyViT"), setting
    assert has("cache_size", "measured HDF5 file", "tinyViT")
    extrapolated = table[(table["benchmark"] == "cache_size") & table["unit"].eq("GiB")]
    assert sorted(set(extrapolated["backbone"])) == ["ViT-B/14", "ViT-L/14", "ViT-S/14", "ViT-g/14"]
    assert len(extrapolated) == 8  # 4 sizes x (lucchi, vnc)
    assert (table[table["benchmark"] == "memory"]["backbone"] == "tinyViT").sum() == 4  # caching + 3 training stages
    for setting in ("train, per 100 slices 64x96", "predict, per 100 slices 64x96", "pixels sampled"):
        assert has("pixelforest", setting, "filterbank"), setting
    assert (table[table["benchmark"] == "memory"]["backbone"] == "filterbank").sum() == 2  # its training and prediction
    assert has("dry_run", "snakemake -n --quiet, published")
    jobs = table[table["setting"] == "jobs in the DAG, published"]["value"]
    assert jobs.empty or int(jobs.iloc[0]) > 100
    gpu = table[table["benchmark"] == "gpu"]
    assert len(gpu) >= 4 and (torch.cuda.is_available() or (gpu["note"] == NO_GPU).all())
    assert set(table[table["benchmark"] == "machine"]["setting"]) >= {"total benchmark time"}


def test_memory_benchmark_writes_its_table(tmp_path):
    from benchmarks.memory import main

    out = tmp_path / "results-memory.csv"
    main(
        ["--scales", "1", "2", "--base-train", "2", "--base-test", "1", "--size", "128"]
        + ["--time-repeats", "1", "--time-epochs", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    )
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS
    assert (table["value"] > 0).all() and table["value"].map(math.isfinite).all()
    settings = table["setting"]
    # streaming at both scales (training and evaluation), in-memory at the largest, two size ratios, the time ratio
    peaks = settings[settings.str.startswith("peak RSS")]
    assert peaks.str.contains("streaming, 1x").sum() == 2 and peaks.str.contains("streaming, 2x").sum() == 2
    assert peaks.str.contains("in-memory, 2x").sum() == 2 and len(peaks) == 6
    assert settings.str.startswith("ratio peak RSS 2x / 1x").sum() == 2
    assert settings.str.startswith("ratio streaming / in-memory").sum() == 1
    assert len(table) == 11
