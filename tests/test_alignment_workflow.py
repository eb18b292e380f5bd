"""Alignment variants in the grid, the tiles, training and evaluation."""

import numpy as np
import pytest
import torch

from em_foundation.config import ConfigError, validate_config
from em_foundation.data.prepared import read_split
from em_foundation.data.tiles import read_tiles, tile_dataset
from em_foundation.evaluation.evaluate import evaluate_model, pooled_scores
from em_foundation.feature_cache import tile_digests
from em_foundation.grid import alignments_for, parse_view, runs
from em_foundation.training.run import load_segmenter, train_run
from tests.helpers import HEAD, TRAINING, make_dataset
from tests.test_config import demo_config


def test_variants_go_where_they_mean_something():
    config = validate_config(
        {
            **demo_config(),
            "regimes": ["head", "lora", "forest"],
            "alignment": {"variants": ["none", "featstd", "adabn-balanced"], "train_sets": ["paired"]},
        }
    )
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
    return {
        "fibsem": make_dataset(root, "fibsem", "fibsem", seed=1),
        "sstem": make_dataset(root, "sstem", "sstem", seed=2),
        "root": root,
    }


def test_intensity_views_normalise_the_tiles(data, tmp_path):
    percentile = tmp_path / "p.h5"
    tile_dataset(data["sstem"]["prepared"], percentile, view=parse_view("tile112o16-percentile"))
    stretched = read_tiles(percentile, "train").raw
    assert np.percentile(stretched, 1) <= 2 and np.percentile(stretched, 99) >= 253
    matched = tmp_path / "h.h5"
    tile_dataset(
        data["sstem"]["prepared"],
        matched,
        view=parse_view("tile112o16-histmatch"),
        reference=data["fibsem"]["prepared"],
    )
    reference = read_split(data["fibsem"]["prepared"], "train").raw
    quantiles = np.percentile(read_tiles(matched, "train").raw, [10, 50, 90])
    assert np.allclose(quantiles, np.percentile(reference, [10, 50, 90]), atol=6)


def train_paired(data, out, alignment="none"):
    """The filter-bank head on the paired demo domains, written to ``out``."""
    out.mkdir()
    return train_run(
        regime="head",
        backbone_name="filterbank",
        train_set="paired",
        datasets=["fibsem", "sstem"],
        seed=0,
        backbone={},
        head=HEAD,
        lora={},
        training=TRAINING,
        alignment=alignment,
        tiles={d: data[d]["tiles"] for d in ("fibsem", "sstem")},
        features={d: data[d]["features"] for d in ("fibsem", "sstem")},
        splits={d: str(data["root"] / f"{d}.split0.json") for d in ("fibsem", "sstem")},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "log.csv",
        out_run=out / "run.json",
    )


def test_featstd_and_adabn_change_the_paired_model_and_its_scores(data, tmp_path):
    plain, standardised = train_paired(data, tmp_path / "none"), train_paired(data, tmp_path / "fs", "featstd-balanced")
    assert standardised["alignment"] == "featstd-balanced" and standardised["balanced"]
    assert plain["best_val_loss"] != standardised["best_val_loss"]
    model = load_segmenter(tmp_path / "none/model.pt", {})
    sstem = data["sstem"]
    scores = {
        alignment: pooled_scores(
            evaluate_model(
                model,
                "head",
                sstem["prepared"],
                sstem["tiles"],
                sstem["features"],
                torch.device("cpu"),
                alignment=alignment,
            )[0]
        )
        for alignment in ("none", "adabn")
    }
    assert scores["none"]["n_pixels"] == scores["adabn"]["n_pixels"]
    assert scores["none"]["fg_iou"] != scores["adabn"]["fg_iou"]
    # the source model is untouched by test-time adaptation
    again = pooled_scores(
        evaluate_model(model, "head", sstem["prepared"], sstem["tiles"], sstem["features"], torch.device("cpu"))[0]
    )
    np.testing.assert_equal(again, scores["none"])  # NaN-aware: a matched IoU without matches is NaN


def test_transductive_is_an_explicit_component():
    from em_foundation.grid import parse_alignment, parse_view, view_of

    assert parse_alignment("featstd")["transductive"] is False
    assert parse_alignment("none")["transductive"] is False
    trans = parse_alignment("featstd-adabn-trans")
    assert trans["transductive"] and trans["feature_std"] and trans["adabn"] and trans["intensity"] == "raw"
    assert parse_alignment("percentile")["intensity"] == "percentile"
    assert parse_alignment("percentile-trans")["intensity"] == "percentile-trans"
    assert parse_view("tile112o16-histmatch-trans")["intensity"] == "histmatch-trans"
    for bad in ("trans", "balanced-trans", "featstd-trans-trans"):
        with pytest.raises(ValueError):
            parse_alignment(bad)
    config = validate_config({**demo_config(), "alignment": {"variants": ["none", "percentile", "percentile-trans"]}})
    assert (
        view_of(config, "filterbank", parse_alignment("percentile-trans")["intensity"]) == "tile112o16-percentile-trans"
    )


def test_intensity_maps_come_from_the_training_split_unless_transductive(data, tmp_path):
    from em_foundation.alignment import histogram_match, intensity_bounds, percentile_normalise, reference_quantiles

    prepared = data["sstem"]["prepared"]
    train, test = read_split(prepared, "train"), read_split(prepared, "test")
    assert intensity_bounds(train.raw) != intensity_bounds(test.raw), "the case needs splits with different statistics"
    inductive, transductive = tmp_path / "i.h5", tmp_path / "t.h5"
    tile_dataset(prepared, inductive, view=parse_view("tile112o16-percentile"))
    tile_dataset(prepared, transductive, view=parse_view("tile112o16-percentile-trans"))
    from em_foundation.data.tile_grid import TileGrid, extract_tiles

    grid = TileGrid.for_shape(*test.raw.shape[1:], 112, 16)
    expected = {
        inductive: percentile_normalise(test.raw, bounds=intensity_bounds(train.raw)),  # the training split's map
        transductive: percentile_normalise(test.raw),  # the test images' own
    }
    for path, normalised in expected.items():
        tiles = read_tiles(path, "test").raw
        assert np.array_equal(tiles, np.concatenate([extract_tiles(image, grid) for image in normalised])), path.name
    assert not np.array_equal(read_tiles(inductive, "test").raw, read_tiles(transductive, "test").raw)
    assert np.array_equal(read_tiles(inductive, "train").raw, read_tiles(transductive, "train").raw)
    matched = tmp_path / "h.h5"
    tile_dataset(prepared, matched, view=parse_view("tile112o16-histmatch"), reference=data["fibsem"]["prepared"])
    quantiles = reference_quantiles(read_split(data["fibsem"]["prepared"], "train").raw)
    from em_foundation.alignment import histogram_matching_table

    table = histogram_matching_table(train.raw, quantiles=quantiles)
    assert np.array_equal(
        read_tiles(matched, "test").raw, np.concatenate([extract_tiles(image, grid) for image in table[test.raw]])
    )
    assert not np.array_equal(table[test.raw], histogram_match(test.raw, quantiles=quantiles))


def test_featstd_and_adabn_use_training_split_statistics_unless_transductive(data, tmp_path):
    """Shift every test token by a constant per channel: statistics taken from the test images
    themselves absorb the shift (transductive scores do not move); statistics from the
    training split do not (inductive scores move), which shows where each took them from."""
    import shutil

    import h5py

    out = tmp_path / "model"
    train_paired(data, out)
    model = load_segmenter(out / "model.pt", {})
    sstem = data["sstem"]
    shifted = tmp_path / "shifted.h5"
    shutil.copy(sstem["features"], shifted)
    with h5py.File(shifted, "r+") as handle:
        tokens = handle["test"]["tokens"][()].astype(np.float32)
        shift = 2.0 * tokens.std(axis=(0, 2, 3), keepdims=True)
        handle["test"]["tokens"][...] = (tokens + shift).astype(np.float16)
        handle["test"]["tokens_digest"][...] = tile_digests(
            handle["test"]["tokens"][()]
        )  # a deliberate edit, not damage

    def changed(alignment):
        """Fraction of predicted pixels that the shift flips."""
        masks = [
            np.stack(
                evaluate_model(
                    model, "head", sstem["prepared"], sstem["tiles"], features, torch.device("cpu"), alignment=alignment
                )[1]
            )
            for features in (sstem["features"], shifted)
        ]
        return float(np.mean(masks[0] != masks[1]))

    for alignment in ("featstd", "adabn"):
        assert changed(f"{alignment}-trans") < 0.002, alignment  # float16 rounding of the shifted tokens only
        assert changed(alignment) > 0.02, alignment
