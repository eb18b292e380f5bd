"""Alignment variants in the grid, the tiles, training and evaluation."""


import numpy as np
import pytest
import torch

from em_foundation.config import ConfigError, validate_config
from em_foundation.data.prepared import read_split
from em_foundation.data.tiles import read_tiles, tile_dataset
from em_foundation.evaluation.evaluate import evaluate_model, pooled_scores
from em_foundation.grid import alignments_for, parse_view, runs
from em_foundation.training.run import load_segmenter, train_run
from tests.helpers import HEAD, TRAINING, make_dataset
from tests.test_config import demo_config


def test_variants_go_where_they_mean_something():
    config = validate_config({**demo_config(), "regimes": ["head", "lora", "forest"],
                              "alignment": {"variants": ["none", "featstd", "adabn-balanced"], "train_sets": ["paired"]}})
    assert alignments_for(config, "head", "paired") == ["none", "featstd", "adabn-balanced"]
    assert alignments_for(config, "lora", "paired") == ["none", "adabn-balanced"]
    assert alignments_for(config, "forest", "paired") == ["none", "featstd"]
    assert alignments_for(config, "head", "fibsem") == ["none"]
    config["alignment"]["train_sets"] = None
    assert alignments_for(config, "head", "fibsem") == ["none", "featstd"], "balanced sampling needs several sources"
    assert {run.alignment for run in runs(config)} == {"none", "featstd", "adabn-balanced"}


def test_unknown_alignment_is_a_config_error():
    with pytest.raises(ConfigError, match="alignment.variants"):
        validate_config({**demo_config(), "alignment": {"variants": ["percentile-histmatch"]}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    return {"fibsem": make_dataset(root, "fibsem", "fibsem", seed=1), "sstem": make_dataset(root, "sstem", "sstem", seed=2), "root": root}


def test_intensity_views_normalise_the_tiles(data, tmp_path):
    percentile = tmp_path / "p.h5"
    tile_dataset(data["sstem"]["prepared"], percentile, view=parse_view("tile112o16-percentile"))
    stretched = read_tiles(percentile, "train").raw
    assert np.percentile(stretched, 1) <= 2 and np.percentile(stretched, 99) >= 253
    matched = tmp_path / "h.h5"
    tile_dataset(data["sstem"]["prepared"], matched, view=parse_view("tile112o16-histmatch"), reference=data["fibsem"]["prepared"])
    reference = read_split(data["fibsem"]["prepared"], "train").raw
    quantiles = np.percentile(read_tiles(matched, "train").raw, [10, 50, 90])
    assert np.allclose(quantiles, np.percentile(reference, [10, 50, 90]), atol=6)


def test_featstd_and_adabn_change_the_paired_model_and_its_scores(data, tmp_path):
    def train(alignment):
        out = tmp_path / alignment
        out.mkdir()
        return train_run(
            regime="head", backbone_name="filterbank", train_set="paired", datasets=["fibsem", "sstem"], seed=0,
            backbone={}, head=HEAD, lora={}, training=TRAINING, alignment=alignment,
            tiles={d: data[d]["tiles"] for d in ("fibsem", "sstem")}, features={d: data[d]["features"] for d in ("fibsem", "sstem")},
            splits={d: str(data["root"] / f"{d}.split0.json") for d in ("fibsem", "sstem")}, device=torch.device("cpu"),
            out_model=out / "model.pt", out_log=out / "log.csv", out_run=out / "run.json",
        )

    plain, standardised = train("none"), train("featstd-balanced")
    assert standardised["alignment"] == "featstd-balanced" and standardised["balanced"]
    assert plain["best_val_loss"] != standardised["best_val_loss"]
    model = load_segmenter(tmp_path / "none/model.pt", {})
    sstem = data["sstem"]
    scores = {
        alignment: pooled_scores(evaluate_model(model, "head", sstem["prepared"], sstem["tiles"], sstem["features"], torch.device("cpu"), alignment=alignment)[0])
        for alignment in ("none", "adabn")
    }
    assert scores["none"]["n_pixels"] == scores["adabn"]["n_pixels"]
    assert scores["none"]["fg_iou"] != scores["adabn"]["fg_iou"]
    # the source model is untouched by test-time adaptation
    again = pooled_scores(evaluate_model(model, "head", sstem["prepared"], sstem["tiles"], sstem["features"], torch.device("cpu"))[0])
    assert again == scores["none"]
