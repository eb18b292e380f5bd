"""Score a trained model on one dataset's test split at the data's native resolution.

Tile logits are turned into probabilities, stitched with overlap blending back onto the
full slice, and only then thresholded and compared with the full-size mask, so every
backbone is scored on the same pixel grid whatever its patch size (defect 4 in docs/published-setup.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from em_foundation.alignment import adapt_batchnorm, domain_stats_from_cache, iterate_batches, segmenter_forward
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.data.splits import section_order
from em_foundation.data.streaming import Part, StoredRows, choose_loading
from em_foundation.data.tiles import TileSet, read_tiles
from em_foundation.evaluation.decision import choose_decision, postprocess
from em_foundation.evaluation.metrics import Counts, confusion, scores
from em_foundation.evaluation.objects import (
    COUNT_COLUMNS,
    THREE_D,
    ObjectCounts,
    counts_columns,
    object_counts,
    scores_columns,
    stack_counts,
)
from em_foundation.feature_cache import check_cache_matches_tiles, to_unit_float
from em_foundation.grid import CACHED_REGIMES, parse_alignment
from em_foundation.io import atomic_path, create_dataset, decode, open_h5, read_json, write_csv, write_json
from em_foundation.regimes import regime_of


def predict_image(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    tile_set: TileSet,
    batch_size: int,
    device: torch.device,
    tokens: torch.Tensor | None = None,
) -> np.ndarray:
    """Foreground probability map of one slice on its native (H, W) grid, from its tiles' inputs.

    ``tokens``: a per-pixel regime's second input beside the pixels (regimes.Regime.pixels).
    """
    if hasattr(model, "predict_slice"):
        # a per-pixel model (the per-pixel forest) computes its features once on the whole slice
        from em_foundation.training.pixelforest import tile_positions

        with torch.inference_mode():
            logits = model.predict_slice(inputs, tile_positions(tile_set), tokens)
        return tile_set.to_native(logits.float().softmax(dim=1)[:, 1].cpu().numpy())
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            extra = {} if tokens is None else {"tokens": tokens[start : start + batch_size].to(device)}
            logits = model(inputs[start : start + batch_size].to(device), tile_set.tile_shape, **extra)
            probabilities.append(logits.float().softmax(dim=1)[:, 1].cpu().numpy())
    return tile_set.to_native(np.concatenate(probabilities))


def _tokens_tensor(chunk: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(chunk))


def split_inputs(
    regime: str, tiles: str | Path, features: str | Path | None, split: str, stats: Any = None
) -> StoredRows:
    """A split's model inputs on disk: cached tokens (standardised with ``stats`` if given) or tile
    pixels (regimes that train the backbone, and the per-pixel forest's first input)."""
    tile_set = read_tiles(tiles, split, with_pixels=False, with_labels=False)
    rows = np.arange(len(tile_set.image_index))
    if regime in CACHED_REGIMES and not regime_of(regime).pixels:
        return StoredRows([Part(str(features), split, "tokens", rows, stats)])
    return StoredRows([Part(str(tiles), split, "raw", rows)])


def slice_probabilities(
    model: torch.nn.Module,
    regime: str,
    tiles: str | Path,
    features: str | Path | None,
    split: str,
    device: torch.device,
    images: list[int] | None = None,
    batch_size: int = 8,
    stats: Any = None,
    data_in_memory: str = "auto",
    adabn_source: str | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(slice index, foreground probability on its native grid) for each slice of ``split``
    (or the ``images`` among them), in order: the one prediction path of the test split
    (evaluate_model) and of a run's validation slices (choose_on_validation).

    ``stats``: per-channel token statistics to standardise with (alignment featstd);
    ``adabn_source``: the split whose batch-norm statistics the model is re-estimated on.
    """
    # A per-pixel regime reads pixels, and tokens where it was given a cache (regimes.reads_tokens).
    pixel_regime = regime_of(regime).pixels
    cached = regime in CACHED_REGIMES and not (pixel_regime and features is None)
    tile_set = read_tiles(tiles, split, with_pixels=False, with_labels=False)
    if cached:
        check_cache_matches_tiles(features, tiles)
    to_tensor = _tokens_tensor if cached and not pixel_regime else to_unit_float
    stored = split_inputs(regime, tiles, features, split, stats)
    # the per-pixel forest's second input: the tokens it upsamples beside its filters
    tokens = split_inputs("head", tiles, features, split, stats) if pixel_regime and cached else None
    loading = choose_loading(stored.nbytes + (tokens.nbytes if tokens else 0), data_in_memory, f"the {split} inputs")
    print(f"evaluation inputs: {loading['mode']} ({loading['reason']})", flush=True)
    inputs_of = stored[:] if loading["mode"] == "in-memory" else stored
    tokens_of = tokens[:] if tokens is not None and loading["mode"] == "in-memory" else tokens
    model = model.to(device).eval()
    if adabn_source is not None:
        # The statistics' split streamed batch by batch (standardised as the scored inputs are).
        source = stored if adabn_source == split else split_inputs(regime, tiles, features, adabn_source, stats)
        model = adapt_batchnorm(model, iterate_batches(source, batch_size, to_tensor), segmenter_forward)
    for image in range(len(tile_set.names)) if images is None else images:
        indices = tile_set.tiles_of(image)
        inputs = to_tensor(inputs_of[indices])
        extra = _tokens_tensor(tokens_of[indices]) if tokens_of is not None else None
        yield image, predict_image(model, inputs, tile_set, batch_size, device, extra)


# Suffixes of the columns scored under a run's validation-chosen decision rules
# (evaluation/decision.py), beside the published columns (threshold 0.5, no post-processing).
TUNED = "_tuned"  # threshold chosen on the run's validation slices
POST = "_post"  # that threshold, holes filled and objects under the validation-chosen size removed
DECISION_SUFFIXES = (TUNED, POST)
PIXEL_COUNT_KEYS = ("tp", "fp", "fn", "tn")


def _scored_columns(prediction: np.ndarray, truth: np.ndarray, min_object_size: int, suffix: str = "") -> dict:
    pixel = scores(confusion(prediction, truth))
    objects = counts_columns(object_counts(prediction, truth, min_object_size))
    return {key + suffix: value for key, value in {**pixel, **objects}.items()}


def evaluate_model(
    model: torch.nn.Module,
    regime: str,
    prepared: str | Path,
    tiles: str | Path,
    features: str | Path | None,
    device: torch.device,
    batch_size: int = 8,
    alignment: str = "none",
    min_object_size: int = 0,
    data_in_memory: str = "auto",
    decision: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Per-image metrics (one row per slice) and the predicted masks, at native resolution.

    Test-time alignment never uses labels. Inductive (default): ``featstd`` standardises the
    test tokens with the per-channel statistics of the test dataset's unlabelled *training*
    split, and ``adabn`` re-estimates the head's batch-norm statistics on that split, so no
    statistic of the images being scored enters their prediction. Transductive (alignment
    component ``trans``): both take the statistics of the test images themselves.

    Each row also carries the slice's object counts (evaluation/objects.py; objects under
    ``min_object_size`` pixels dropped from both sides), pooled by ``pooled_scores``.
    With ``decision`` (run.json's, chosen on the run's validation slices) every pixel and
    object column is also scored at its threshold (suffix ``_tuned``) and after its
    post-processing (``_post``); the unsuffixed columns stay the published 0.5 cut.

    Inputs and masks are read slice by slice as each is scored (``data_in_memory`` never,
    or auto where the test split does not fit in memory), or the test split's inputs once
    (always, or auto where they fit); the metrics are the same.
    """
    options = parse_alignment(alignment)
    statistics_split = "test" if options["transductive"] else "train"
    stats = domain_stats_from_cache(features, statistics_split) if options["feature_std"] else None
    probabilities = slice_probabilities(
        model,
        regime,
        tiles,
        features,
        "test",
        device,
        batch_size=batch_size,
        stats=stats,
        data_in_memory=data_in_memory,
        adabn_source=statistics_split if options["adabn"] else None,
    )
    names, truth_of = _truth_reader(prepared)
    rows, predictions = [], []
    for image, probability in tqdm(probabilities, total=len(names), desc="evaluate", unit="slice"):
        prediction = (probability >= 0.5).astype(np.uint8)
        truth = truth_of(image)
        if prediction.shape != truth.shape:
            raise AssertionError(f"prediction {prediction.shape} is not at native resolution {truth.shape}")
        row = {"image": names[image], "height": prediction.shape[0], "width": prediction.shape[1]}
        row.update(_scored_columns(prediction, truth, min_object_size))
        if decision is not None:
            tuned = (probability >= float(decision["threshold"])).astype(np.uint8)
            row.update(_scored_columns(tuned, truth, min_object_size, TUNED))
            post = postprocess(tuned, int(decision["min_size_px"]))
            row.update(_scored_columns(post, truth, min_object_size, POST))
        rows.append(row)
        predictions.append(prediction)
    return pd.DataFrame(rows), predictions


def native_labels(tile_set: TileSet, label_tiles: np.ndarray) -> np.ndarray:
    """One slice's mask on its native grid from its tiles' labels (0, 1, IGNORE_LABEL).

    Exact in tile mode (overlapping tiles carry the same labels); in resize mode the
    resampled mask is interpolated back and pixels touched by an ignored one stay ignored.
    """
    valid = tile_set.to_native((label_tiles != IGNORE_LABEL).astype(np.float32)) > 1 - 1e-3
    foreground = tile_set.to_native((label_tiles == 1).astype(np.float32)) >= 0.5
    return np.where(valid, foreground, IGNORE_LABEL).astype(np.uint8)


def choose_on_validation(
    model: torch.nn.Module,
    regime: str,
    datasets: list[str],
    tiles: dict[str, str],
    features: dict[str, str] | None,
    splits: dict[str, str],
    device: torch.device,
    feature_std: bool = False,
    batch_size: int = 8,
) -> dict[str, Any]:
    """A trained model's decision rules (evaluation/decision.py), chosen on its validation slices.

    The validation slices are those of the run's split files, read from the training split
    of each dataset's tiles and predicted through the same path as the test split; no
    test slice is read. Tokens are standardised as training standardised them (featstd:
    each dataset's own training-split statistics).
    """
    probabilities, truths = [], []
    for dataset in datasets:
        tile_set = read_tiles(tiles[dataset], "train", with_pixels=False, with_labels=False)
        val_names = set(read_json(splits[dataset])["val"])
        images = [i for i, name in enumerate(tile_set.names) if name in val_names]
        cache = features[dataset] if features else None
        stats = domain_stats_from_cache(cache, "train", dataset=dataset) if feature_std and cache else None
        with open_h5(tiles[dataset]) as handle:
            labels = handle["train"]["labels"]
            for image, probability in slice_probabilities(
                model, regime, tiles[dataset], cache, "train", device, images, batch_size, stats
            ):
                truth = native_labels(tile_set, labels[np.sort(tile_set.tiles_of(image))])
                probabilities.append(probability)
                truths.append(truth)
    decision = choose_decision(probabilities, truths)
    print(
        f"decision on {len(probabilities)} validation slices: threshold {decision['threshold']:.2f}, "
        f"smallest kept object {decision['min_size_px']} px ({decision['chosen_on']})",
        flush=True,
    )
    return decision


def _truth_reader(prepared: str | Path) -> tuple[list[str], Any]:
    """The test slices' names, and a reader of one slice's native mask (one slice in memory at a time)."""
    with open_h5(prepared) as handle:
        if "test" not in handle:
            raise KeyError(f"{prepared}: no split 'test'; has {', '.join(handle)}")
        names = [decode(n) for n in handle["test"]["names"][()]]

    def truth_of(image: int) -> np.ndarray:
        with open_h5(prepared) as handle:
            return handle["test"]["labels"][image]

    return names, truth_of


def stack_object_counts(prepared: str | Path, predictions: list[np.ndarray], min_object_size: int = 0) -> ObjectCounts:
    """Object counts over the test split as one volume: components joined across consecutive slices.

    Only meaningful where the test split is a contiguous stack (data/registry.has_stack_test_split);
    the slices are put in stack order by their names first.
    """
    names, truth_of = _truth_reader(prepared)  # the masks only, not the images
    position = {name: i for i, name in enumerate(map(str, names))}
    order = [position[name] for name in section_order(list(position))]
    return stack_counts([predictions[i] for i in order], [truth_of(i) for i in order], min_object_size, three_d=True)


def pooled_scores(per_image: pd.DataFrame, objects_3d: ObjectCounts | None = None) -> dict[str, Any]:
    """Pixel scores from the summed confusion counts; 2-D object scores from the summed per-slice
    object counts (where the table has them) and, given, the 3-D ones (columns suffixed ``_3d``)."""
    total = Counts(*(int(per_image[key].sum()) for key in ("tp", "fp", "fn", "tn")))
    pooled = {**scores(total), "n_images": int(len(per_image))}
    if set(COUNT_COLUMNS) <= set(per_image.columns):
        objects = ObjectCounts(*(per_image[column].sum().item() for column in COUNT_COLUMNS))
        pooled.update(scores_columns(objects))
        if objects_3d is not None:  # absent, not NaN, where the test split is no stack (tables fill NaN)
            pooled.update(scores_columns(objects_3d, THREE_D))
    for suffix in DECISION_SUFFIXES:  # the validation-chosen decision rules' columns, where scored
        if f"tp{suffix}" not in per_image.columns:
            continue
        total = Counts(*(int(per_image[key + suffix].sum()) for key in PIXEL_COUNT_KEYS))
        pooled.update({key + suffix: value for key, value in scores(total).items()})
        objects = ObjectCounts(*(per_image[column + suffix].sum().item() for column in COUNT_COLUMNS))
        pooled.update(scores_columns(objects, suffix))
    return pooled


def write_evaluation(
    per_image: pd.DataFrame,
    predictions: list[np.ndarray],
    record: dict[str, Any],
    out_metrics: Path,
    out_images: Path,
    out_predictions: Path,
    keep: int,
    objects_3d: ObjectCounts | None = None,
) -> dict[str, Any]:
    metrics = {**record, **pooled_scores(per_image, objects_3d)}
    write_csv(per_image.assign(**{k: v for k, v in record.items() if not isinstance(v, (dict, list))}), out_images)
    with atomic_path(out_predictions, suffix=".h5") as tmp, h5py.File(tmp, "w") as handle:
        for name, prediction in zip(per_image["image"][:keep], predictions[:keep]):
            create_dataset(handle, str(name), data=prediction, compression="gzip")
    write_json(out_metrics, metrics)
    return metrics
