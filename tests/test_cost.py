"""benchmarks.cost: the grid's hours and disk from measured unit costs."""

import copy

import h5py
import pandas as pd
import pytest
import torch
from workflow import demo_config

from benchmarks import cost, gpu_check
from em_foundation import grid
from em_foundation.backbones import build_backbone
from em_foundation.config import validate_config
from em_foundation.data.convert import prepare_dataset
from em_foundation.data.tiles import tile_dataset
from em_foundation.feature_cache import cache_features


def tiny_demo() -> dict:
    config = demo_config()
    config["datasets"] = {"fibsem": config["datasets"]["fibsem"]}
    config["training_sets"] = {"fibsem": ["fibsem"]}
    config["backbones"] = {"tinyvit": config["backbones"]["tinyvit"]}
    return validate_config(config)


def cpu_costs(tmp_path) -> cost.UnitCosts:
    """Real gpu_check rows measured on this CPU with a tiny model."""
    frame = gpu_check.run_check(
        gpu_check.Check(
            device=torch.device("cpu"),
            model="vit_small_patch14_dinov2",
            model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
            tile=28,
            n_tiles=4,
            head_steps=1,
            lora_steps=1,
            warmup_steps=0,
            head_width=8,
        ),
        tmp_path,
    )
    path = tmp_path / "gpu.csv"
    frame.to_csv(path, index=False)
    return cost.unit_costs(path, speedup=None)


def test_disk_estimate_equals_the_cache_and_tiles_the_workflow_writes(tmp_path):
    config = tiny_demo()
    prepared = tmp_path / "results/prepared/fibsem.h5"
    prepared.parent.mkdir(parents=True)
    prepare_dataset("fibsem", config["datasets"]["fibsem"], None, prepared, tmp_path / "integrity.json")
    tiles, features = tmp_path / "tiles.h5", tmp_path / "features.h5"
    tile_dataset(prepared, tiles, view=grid.parse_view(grid.view_of(config, "tinyvit")))
    cache_features(build_backbone(config["backbones"]["tinyvit"]), tiles, features, 8, torch.device("cpu"), {})
    with h5py.File(features) as handle:
        token_bytes = sum(handle[split]["tokens"].nbytes for split in handle)
    with h5py.File(tiles) as handle:
        pixel_bytes = sum(handle[split][name].nbytes for split in handle for name in ("raw", "labels"))

    frame = cost.estimate(config, cpu_costs(tmp_path), epochs=3, workdir=tmp_path).set_index("stage")
    assert frame.loc["cache_features", "disk_gib"] * 2**30 == pytest.approx(token_bytes)
    assert frame.loc["tile_dataset", "disk_gib"] * 2**30 == pytest.approx(pixel_bytes)


def test_jobs_match_the_grid_and_training_hours_scale_with_epochs(tmp_path):
    config = validate_config(demo_config())
    costs = cpu_costs(tmp_path)
    three = cost.estimate(config, costs, epochs=3).set_index("stage")
    six = cost.estimate(config, costs, epochs=6).set_index("stage")
    runs = grid.runs(config)
    for regime in ("head", "lora", "supervised"):
        assert three.loc[f"train_{regime}", "jobs"] == sum(run.regime == regime for run in runs)
        assert six.loc[f"train_{regime}", "hours_expected"] == pytest.approx(
            2 * three.loc[f"train_{regime}", "hours_expected"]
        )
        assert three.loc[f"train_{regime}", "hours_ceiling"] == pytest.approx(
            three.loc[f"train_{regime}", "hours_expected"] * config["training"]["max_epochs"] / 3
        )
    assert three.loc["evaluate", "jobs"] == len(runs)
    assert three.loc["cache_features", "jobs"] == len(grid.feature_backbones(config)) * len(config["datasets"])
    assert three.loc["evaluate", "hours_expected"] == six.loc["evaluate", "hours_expected"]
    assert three.loc["total", "hours_expected"] == pytest.approx(three.drop(index="total").hours_expected.sum())
    assert three.loc["cache_features", "backbone_tflops"] > 0  # the ViT is counted; the filter bank is not torch work


def test_published_resize_inputs_are_counted_on_their_real_shape():
    """Lucchi++'s 768x1024 slices at longest edge 1022 are 756x1022 inputs: FLOPs counted on that shape."""
    config = validate_config(copy.deepcopy(__import__("yaml").safe_load((cost.REPO / "config.yaml").read_text())))
    config["tiling"].update(mode="resize", longest_edge=1022)
    spec = config["backbones"]["dinov2L"]
    assert cost.inputs_per_slice(config, spec, 768, 1024) == (1, 756, 1022)
    tflops, channels, patch = cost.backbone_forward(spec, 756, 1022)
    n, d, depth = 54 * 73 + 1, 1024, 24
    by_hand = 2 * (n - 1) * 3 * 14 * 14 * d + depth * (24 * n * d * d + 4 * n * n * d)
    assert (channels, patch) == (1024, 14)
    assert tflops * 1e12 == pytest.approx(by_hand, rel=1e-9)


def test_cpu_table_gives_cpu_hours_unless_a_speedup_is_given():
    plain = cost.unit_costs(cost.REPO / "benchmarks/results-cpu.csv", speedup=None)
    faster = cost.unit_costs(cost.REPO / "benchmarks/results-cpu.csv", speedup=50.0)
    assert "benchmark CPU" in plain.device_hours and "50.0x" in faster.device_hours
    assert faster.lora_s_per_tflop == pytest.approx(plain.lora_s_per_tflop / 50)
    frame = pd.read_csv(cost.REPO / "benchmarks/results-cpu.csv")
    tiles_per_s = frame[
        (frame.benchmark == "caching") & (frame.backbone == "ViT-L/14") & frame.setting.str.startswith("cache_features")
    ].value.iloc[0]
    reference, _, _ = cost.backbone_forward(cost.REFERENCE_SPEC, 448, 448)
    assert plain.cache_s_per_tflop == pytest.approx(1 / (tiles_per_s * reference))


def test_unknown_dataset_size_says_how_to_get_it():
    config = tiny_demo()
    config["datasets"]["fibsem"]["converter"] = "kasthuri_pp"
    with pytest.raises(SystemExit, match="datasets.fibsem: .*kasthuri_pp.*--until prepare_dataset"):
        cost.dataset_splits("fibsem", config["datasets"]["fibsem"], None)
