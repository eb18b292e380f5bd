"""The per-pixel forest (regime pixelforest): full-resolution features, native-shape predictions,
seeded determinism, calibration, and the ViT-token path (upsampled tokens beside the filter bank)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from em_foundation.backbones.filterbank import ilastik_channel_names, pixel_features, pool_to_grid
from em_foundation.data.tile_grid import TileGrid, extract_tiles
from em_foundation.data.tiles import TileSet
from em_foundation.evaluation.evaluate import evaluate_model, pooled_scores
from em_foundation.evaluation.metrics import confusion, scores
from em_foundation.grid import alignments_for
from em_foundation.regimes import reads_tokens
from em_foundation.training.forest import ForestSegmenter, fit_forest
from em_foundation.training.pixelforest import (
    DEFAULT_SIGMAS,
    PixelFeatures,
    PixelForestSegmenter,
    SplitTiles,
    assemble_slice,
    bank_channel_names,
    best_threshold,
    calibrate,
    fit_pixel_forest,
    pixel_bank,
    sample_pixels,
    slice_probability,
    tokens_at,
)
from em_foundation.training.run import load_segmenter, train_run
from tests.helpers import TINY_VIT, make_dataset

SIGMAS = (0.7, 1.6)
OPTIONS = {"n_estimators": 10, "max_depth": None, "min_samples_leaf": 1, "pixels_per_tile": 400}


def line_tiles(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy bright tiles crossed by one-pixel-wide dark lines (the foreground), at random rows and columns."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(170, 12, (n, size, size))
    labels = np.zeros((n, size, size), np.uint8)
    for tile in range(n):
        for row in rng.choice(np.arange(4, size - 4), 3, replace=False):
            labels[tile, row, :] = 1
        for col in rng.choice(np.arange(4, size - 4), 3, replace=False):
            labels[tile, :, col] = 1
    raw[labels == 1] -= 90
    return np.clip(raw, 0, 255).astype(np.uint8), labels


def in_memory(raw: np.ndarray, labels: np.ndarray) -> SplitTiles:
    """Every tile a training tile, one slice each: what fit_pixel_forest reads of a dataset."""
    n, size = len(raw), raw.shape[-1]
    tile_set = TileSet(
        raw=raw,
        labels=labels,
        image_index=np.arange(n),
        positions=np.zeros((n, 2), np.int32),
        names=[f"s{i}" for i in range(n)],
        height=size,
        width=size,
        tile=size,
        overlap=0,
    )
    return SplitTiles("lines", tile_set, None, np.ones(n, bool), np.zeros(n, bool), {})


def fitted(raw, labels, seed=0, options=OPTIONS):
    spec = PixelFeatures(sigmas=SIGMAS, bank=True, token_channels=0)
    forest, sample = fit_pixel_forest([in_memory(raw, labels)], spec, options, seed)
    return PixelForestSegmenter(forest, spec, 0.0), sample


def predict(model, raw: np.ndarray) -> np.ndarray:
    pixels = torch.from_numpy(raw).float().div(255.0)[:, None]
    with torch.no_grad():
        return model(pixels, tuple(raw.shape[-2:])).softmax(dim=1)[:, 1].numpy()


@pytest.fixture(scope="module")
def lines():
    return line_tiles(6, seed=0), line_tiles(2, seed=1)


def test_one_pixel_lines_survive_at_native_shape_where_8x8_tokens_lose_them(lines):
    (raw, labels), (test_raw, test_labels) = lines
    model, _ = fitted(raw, labels)
    probability = predict(model, test_raw)
    assert probability.shape == test_raw.shape, "a prediction per pixel at the tile's own shape"
    pixel_iou = scores(confusion((probability >= 0.5).astype(np.uint8), test_labels))["fg_iou"]
    # the pixels beside a line are background: only full-resolution features can tell them apart
    assert pixel_iou > 0.7, pixel_iou

    # The token forest on the same bank pooled to 8×8 patches: a 1-px line is 1/8 of a patch,
    # never a token majority, so the token forest has no foreground to learn and the lines vanish.
    def tokens_of(images):
        return np.stack([pool_to_grid(pixel_features(image / 255.0, SIGMAS), 8) for image in images])

    forest, _ = fit_forest(tokens_of(raw), labels, 8, {**OPTIONS, "tokens_per_tile": 64}, seed=0)
    with torch.no_grad():
        logits = ForestSegmenter(forest)(torch.from_numpy(tokens_of(test_raw)), tuple(test_raw.shape[-2:]))
    token_prediction = (logits.softmax(dim=1)[:, 1].numpy() >= 0.5).astype(np.uint8)
    token_iou = scores(confusion(token_prediction, test_labels))["fg_iou"]
    assert token_iou < 0.1 < pixel_iou - 0.5, (token_iou, pixel_iou)


def test_same_seed_same_output_different_seeds_differ(lines):
    (raw, labels), (test_raw, _) = lines
    first, second, other = (predict(fitted(raw, labels, seed)[0], test_raw) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_sample_is_class_balanced_seeded_and_labelled_only():
    labels = np.zeros((3, 32, 32), np.uint8)
    labels[:, :4] = 1  # 1/8 foreground
    labels[0, 20:] = 255  # ignored pixels are never drawn
    chosen = sample_pixels(labels, 100, np.random.default_rng(0))
    drawn = np.concatenate([labels[t].ravel()[c] for t, c in enumerate(chosen)])
    assert len(drawn) == 300 and (drawn == 1).sum() == (drawn == 0).sum() == 150
    again = sample_pixels(labels, 100, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(chosen, again))


def test_prior_correction_lowers_the_foreground_fraction_towards_the_truth():
    # 8 % foreground pixels, a little brighter than the background, the two overlapping: a forest
    # trained on a balanced sample (prior 50 %) calls far too many background pixels foreground.
    rng = np.random.default_rng(0)
    labels = (rng.random((6, 48, 48)) < 0.08).astype(np.uint8)
    raw = np.clip(rng.normal(120, 20, labels.shape) + 30 * labels, 0, 255).astype(np.uint8)
    model, sample = fitted(raw[:4], labels[:4], options={**OPTIONS, "max_depth": 3, "pixels_per_tile": 200})
    assert sample["sample_prior"] == pytest.approx(0.5) and sample["train_prior"] < 0.1
    calibration = calibrate("prior", sample, np.zeros(0), np.zeros(0, np.uint8))
    assert calibration["calibration_applied"] == "prior" and calibration["threshold"] > 0.5
    raw_fraction = (predict(model, raw[4:]) >= 0.5).mean()
    model.log_odds_shift = calibration["log_odds_shift"]
    corrected_fraction = (predict(model, raw[4:]) >= 0.5).mean()
    truth = labels[4:].mean()
    assert corrected_fraction < raw_fraction, (corrected_fraction, raw_fraction)
    assert abs(corrected_fraction - truth) < abs(raw_fraction - truth), (corrected_fraction, raw_fraction, truth)


def test_validation_threshold_maximises_foreground_iou():
    rng = np.random.default_rng(0)
    truth = (rng.random(5000) < 0.1).astype(np.uint8)
    probability = np.clip(0.55 * truth + 0.5 * rng.random(5000), 0, 1)
    threshold, iou = best_threshold(probability, truth)
    brute = {
        t: scores(confusion((probability >= t).astype(np.uint8), truth))["fg_iou"] for t in np.arange(1, 100) / 100
    }
    assert iou == pytest.approx(max(brute.values())) and brute[threshold] == pytest.approx(iou)
    calibration = calibrate("validation", {"train_prior": 0.1, "sample_prior": 0.5}, probability, truth)
    assert calibration["calibration_applied"] == "validation"
    assert calibration["threshold"] == pytest.approx(threshold)
    # without validation foreground there is no threshold to choose: the prior correction, said so
    fallback = calibrate("validation", {"train_prior": 0.1, "sample_prior": 0.5}, probability, np.zeros_like(truth))
    assert fallback["calibration_applied"].startswith("prior") and fallback["threshold"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="pixelforest.calibration"):
        calibrate("platt", {}, probability, truth)


def test_tokens_at_is_bilinear_upsampling_at_the_asked_pixels():
    tokens = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    shape = (48, 56)
    full = F.interpolate(torch.from_numpy(tokens)[None], size=shape, mode="bilinear", align_corners=False)[0]
    flat = np.arange(shape[0] * shape[1])
    np.testing.assert_allclose(tokens_at(tokens, flat, shape), full.reshape(5, -1).T.numpy(), atol=1e-5)


def test_bank_is_ilastiks_set_with_difference_of_gaussians():
    names = bank_channel_names(SIGMAS)
    assert names == ilastik_channel_names(SIGMAS) and len(names) == 8 * len(SIGMAS)
    assert "dog@1.6" in names and "st2@0.7" in names and "raw" not in names
    assert len(bank_channel_names(DEFAULT_SIGMAS)) == 49  # ilastik's full selection at its 7 scales
    image = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    bank = pixel_bank(image, SIGMAS)
    assert bank.shape == (len(names), 40, 48) and bank.dtype == np.float32


def test_regime_reads_tokens_only_for_vit_families_and_takes_no_batch_alignments():
    assert reads_tokens("pixelforest", "dinov2") and not reads_tokens("pixelforest", "filterbank")
    assert reads_tokens("forest", "filterbank")
    config = {
        "alignment": {"variants": ["none", "featstd", "adabn", "histmatch"], "train_sets": None},
        "training_sets": {"a": ["a"]},
    }
    assert alignments_for(config, "pixelforest", "a") == ["none", "histmatch"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixelforest")
    return {
        "filterbank": make_dataset(root, "fibsem", "fibsem", seed=1),
        "vit": make_dataset(root, "vit", "fibsem", seed=1, backbone=TINY_VIT),
        "root": root,
    }


def run_pixelforest(datasets, kind: str, tmp_path, calibration="validation", with_filterbank=True):
    paths = datasets[kind]
    name = "fibsem" if kind == "filterbank" else "vit"
    record = train_run(
        regime="pixelforest",
        backbone_name=kind,
        train_set=name,
        datasets=[name],
        seed=0,
        backbone={},
        head={},
        lora={},
        training={},
        pixelforest={
            **OPTIONS,
            "sigmas": list(SIGMAS),
            "with_filterbank": with_filterbank,
            "calibration": calibration,
        },
        tiles={name: paths["tiles"]},
        features={name: paths["features"]} if kind == "vit" else None,
        splits={name: str(datasets["root"] / f"{name}.split0.json")},
        device=torch.device("cpu"),
        out_model=tmp_path / "model.pt",
        out_log=tmp_path / "train_log.csv",
        out_run=tmp_path / "run.json",
    )
    return record, load_segmenter(tmp_path / "model.pt", {})


def test_filterbank_run_records_its_calibration_and_predicts_native_slices(datasets, tmp_path):
    record, model = run_pixelforest(datasets, "filterbank", tmp_path)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["calibration"] == "validation" and saved["calibration_applied"] == "validation"
    assert 0 < saved["threshold"] < 1 and saved["features"] == {
        "channels": len(bank_channel_names(SIGMAS)),
        "token_channels": 0,
        "filterbank": True,
    }
    stored = torch.load(tmp_path / "model.pt", weights_only=False)["calibration"]
    assert stored["threshold"] == saved["threshold"]
    # no feature cache: the filter bank is computed from the tiles at full resolution
    per_image, predictions = evaluate_model(
        model,
        "pixelforest",
        datasets["filterbank"]["prepared"],
        datasets["filterbank"]["tiles"],
        None,
        torch.device("cpu"),
    )
    assert all(p.shape == (128, 128) for p in predictions)
    assert pooled_scores(per_image)["fg_iou"] > 0.3


def test_vit_run_upsamples_tokens_beside_the_filter_bank(datasets, tmp_path):
    paths = datasets["vit"]
    embed = TINY_VIT["model_kwargs"]["embed_dim"]
    record, model = run_pixelforest(datasets, "vit", tmp_path)
    assert record["features"] == {
        "channels": embed + len(bank_channel_names(SIGMAS)),
        "token_channels": embed,
        "filterbank": True,
    }
    assert model.forest.n_features_in_ == embed + len(bank_channel_names(SIGMAS))
    per_image, predictions = evaluate_model(
        model, "pixelforest", paths["prepared"], paths["tiles"], paths["features"], torch.device("cpu")
    )
    assert all(p.shape == (128, 128) for p in predictions) and len(per_image) == 2
    tokens_only, _ = run_pixelforest(datasets, "vit", tmp_path / "tokens", with_filterbank=False)
    assert tokens_only["features"]["channels"] == embed


def test_features_at_every_pixel_of_a_tile_equal_those_of_the_whole_slice():
    """Tiles of a slice (448-style overlap, last tile flush with the border) get the bank of
    the whole slice at their pixels: no mirrored tile borders, no seams, even at sigma 10."""
    rng = np.random.default_rng(3)
    slice_ = rng.random((150, 170)).astype(np.float32)
    grid = TileGrid.for_shape(150, 170, 64, 16)
    tiles = extract_tiles(slice_, grid)
    positions = np.array(grid.positions)
    spec = PixelFeatures(sigmas=(0.3, 1.0, 10.0), bank=True, token_channels=0)
    whole = pixel_bank(slice_, spec.sigmas)
    bank = spec.slice_bank(assemble_slice(tiles, positions))
    flat = np.arange(64 * 64)
    for (y, x), tile in zip(positions, tiles):
        got = spec.at(bank, None, flat, (64, 64), (y, x))
        np.testing.assert_array_equal(got, whole[:, y : y + 64, x : x + 64].reshape(len(whole), -1).T)
    # what the per-tile bank (the tile alone, mirrored at its border) would have given instead
    alone = pixel_bank(tiles[1], spec.sigmas)
    assert np.abs(alone - whole[:, positions[1][0] :, positions[1][1] :][:, :64, :64]).max() > 1e-3


def test_slice_prediction_predicts_each_pixel_once_and_equals_the_per_pixel_forest(lines):
    (raw, labels), _ = lines
    model, _ = fitted(raw, labels)
    rng = np.random.default_rng(4)
    slice_ = rng.random((100, 120)).astype(np.float32)
    grid = TileGrid.for_shape(100, 120, 64, 16)
    tiles, positions = extract_tiles(slice_, grid), np.array(grid.positions)
    probabilities = slice_probability(model.forest, model.spec, tiles, positions)
    whole = pixel_bank(slice_, SIGMAS).reshape(len(bank_channel_names(SIGMAS)), -1).T
    expected = model.forest.predict_proba(whole)[:, 1].reshape(100, 120)
    for (y, x), probability in zip(positions, probabilities):
        np.testing.assert_array_equal(probability, expected[y : y + 64, x : x + 64])
    log_probs = model.predict_slice(torch.from_numpy(tiles)[:, None], positions)
    np.testing.assert_allclose(
        log_probs.softmax(dim=1)[:, 1].numpy(),
        1 / (1 + np.exp(-model.calibrated(np.stack(probabilities)))),
        rtol=1e-5,
    )
