"""Pixel size: recorded by every dataset, and tiling.pixel_size_nm resamples before tiling."""

from __future__ import annotations

import numpy as np
import pytest

from em_foundation.config import ConfigError, validate_config
from em_foundation.data.convert import prepare_dataset
from em_foundation.data.prepared import pixel_size_of, read_split
from em_foundation.data.tiles import read_tiles, tile_dataset
from em_foundation.grid import parse_view, view_of
from tests.test_config import demo_config
from tests.test_em_datasets import spec_for


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic FIB-SEM dataset (5 nm pixels), 96 x 80."""
    out = tmp_path_factory.mktemp("pixel")
    spec = spec_for("synthetic", domain="fibsem", n_train=2, n_test=2, height=96, width=80, seed=1)
    report = prepare_dataset("fib", spec, None, out / "fib.h5", out / "fib.integrity.json")
    return out / "fib.h5", report


def test_every_dataset_records_its_pixel_size(prepared):
    path, report = prepared
    assert pixel_size_of(path) == (5.0, 5.0)
    assert report["pixel_size_nm"] == [5.0, 5.0]


def test_view_name_carries_the_target_pixel_size():
    config = validate_config(demo_config())
    native = view_of(config, "filterbank")
    config = demo_config()
    config.setdefault("tiling", {})["pixel_size_nm"] = 4.6
    resampled = view_of(validate_config(config), "filterbank")
    assert resampled == f"{native}nm4.6" and resampled != native
    assert parse_view(resampled)["pixel_size_nm"] == 4.6 and parse_view(native)["pixel_size_nm"] is None
    assert parse_view(f"{resampled}-percentile-trans")["intensity"] == "percentile-trans"


def test_resize_mode_refuses_a_pixel_size():
    config = demo_config()
    config.setdefault("tiling", {}).update(mode="resize", pixel_size_nm=5.0)
    with pytest.raises(ConfigError, match="tiling.pixel_size_nm applies to tile mode only"):
        validate_config(config)


def test_resampled_tiles_go_back_to_the_native_grid(prepared, tmp_path):
    path, _ = prepared
    tiles = tmp_path / "tiles.h5"
    tile_dataset(path, tiles, view=parse_view("tile32o8nm10"), view_name="tile32o8nm10")  # 5 nm -> 10 nm: half size
    tile_set = read_tiles(tiles, "test")
    assert (tile_set.height, tile_set.width) == (96, 80)
    assert (tile_set.grid_height, tile_set.grid_width) == (48, 40)
    truth = read_split(path, "test")
    # the stitched label tiles, brought back to the native grid, agree with the native labels on most pixels
    labels = tile_set.to_native(tile_set.labels[tile_set.tiles_of(0)].astype(np.float32))
    assert labels.shape == (96, 80)
    agreement = ((labels >= 0.5) == (truth.labels[0] == 1)).mean()
    assert agreement > 0.9, agreement
    native = tmp_path / "native.h5"
    tile_dataset(path, native, view=parse_view("tile32o8"), view_name="tile32o8")
    assert len(read_tiles(native, "test").raw) > len(tile_set.raw)  # more tiles at the finer native size


def test_kasthuri_of_the_extended_config_prepares_with_its_pixel_size(tmp_path):
    """The extended config's Kasthuri++ entry, on an archive written in the real layout: 3 nm, ignore honoured."""
    from em_foundation.config import load_config
    from tests.test_em_datasets import kasthuri_archive
    from tests.workflow import REPO

    spec = load_config(REPO / "profiles/extended/workflow_config.yaml")["datasets"]["kasthuri"]
    archive, _ = kasthuri_archive(tmp_path / "kasthuri_pp.zip")
    report = prepare_dataset("kasthuri", spec, archive, tmp_path / "k.h5", tmp_path / "k.integrity.json")
    assert pixel_size_of(tmp_path / "k.h5") == (3.0, 3.0) and report["pixel_size_nm"] == [3.0, 3.0]
    assert report["splits"]["train"]["label_counts"]["255"] > 0  # the unlabelled (2,2,2) areas


def rescale_config(**alignment) -> dict:
    config = demo_config()
    config["alignment"] = {"variants": ["none", "rescale", "rescale-percentile"], "train_sets": ["paired"], **alignment}
    return config


def test_rescale_variant_reads_tiles_and_features_at_the_common_pixel_size():
    """The alignment variant `rescale` (the alignment figure's pixel-size bar) reads the nm views."""
    from em_foundation.grid import alignments_for, input_variant

    config = validate_config(rescale_config(pixel_size_nm=10.0))
    assert alignments_for(config, "head", "paired") == ["none", "rescale", "rescale-percentile"]
    assert alignments_for(config, "head", "fibsem") == ["none"]
    native = view_of(config, "filterbank")
    assert input_variant(config, "none") == "raw" and view_of(config, "filterbank", "raw") == native
    assert input_variant(config, "rescale") == "nm10"
    assert view_of(config, "filterbank", input_variant(config, "rescale")) == f"{native}nm10"
    assert view_of(config, "filterbank", input_variant(config, "rescale-percentile")) == f"{native}nm10-percentile"
    assert parse_view(f"{native}nm10-percentile") == {
        **parse_view(native),
        "pixel_size_nm": 10.0,
        "intensity": "percentile",
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({}, "set alignment.pixel_size_nm"),
        ({"tiling": {"mode": "resize"}}, "needs tiling.mode: tile"),
        ({"tiling": {"pixel_size_nm": 4.6}}, "both set a pixel size"),
    ],
)
def test_rescale_variant_needs_one_target_pixel_size_and_native_tiles(change, message):
    config = rescale_config(pixel_size_nm=None if not change else 5.0)
    for block, values in change.items():
        config.setdefault(block, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_rescale_runs_in_the_workflow_dry_run(tmp_path):
    """A dry run of the demo with the rescale variant schedules tiles and caches at the common pixel size."""
    from tests.workflow import snakemake, write_config

    config = validate_config(rescale_config(pixel_size_nm=10.0))
    config["backbones"] = {"filterbank": config["backbones"]["filterbank"]}
    configfile = write_config(tmp_path / "config.yaml", config)
    text = snakemake(tmp_path, "-n", "-p", configfile=configfile).stdout
    native = view_of(config, "filterbank")
    assert f"results/tiles/{native}nm10/fibsem.h5" in text and f"results/tiles/{native}nm10/sstem.h5" in text
    assert "results/features/filterbank/nm10-percentile/sstem.h5" in text
    assert "results/models/filterbank/head/paired/rescale/seed0/model.pt" in text
    assert "results/models/filterbank/head/fibsem/rescale/seed0/model.pt" not in text
