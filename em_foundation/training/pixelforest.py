"""The ``pixelforest`` regime: a random forest on per-pixel features, as ilastik classifies pixels.

Why: the ``forest`` regime classifies 8×8 (or 14×14, 16×16) patch tokens and upsamples the
probabilities, so no structure thinner than a patch survives. ilastik's baseline is a forest
on filter responses *per pixel*; this regime measures that, and the same forest on VFM
tokens upsampled to the pixel grid (napari-convpaint, FeatureForest), beside the others.

Features, per pixel at full resolution, computed on the fly from the tiles and never cached
(a per-pixel cache of Lucchi++ would be tens of GB), always on the whole slice that a slice's
tiles are reassembled into (``assemble_slice``), so no tile border sees mirrored pixels that
ilastik would not see:

- the filter bank (``pixel_bank``): ilastik's pixel-classification features with ilastik's
  arithmetic (``backbones/filterbank.ilastik_features``): at its scales 0.3-10 px, Gaussian
  smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, difference of Gaussians,
  structure-tensor and Hessian-of-Gaussian eigenvalues, each where ilastik offers it (only
  smoothing at 0.3), 49 channels. Why not scikit-image's ``multiscale_basic_features``: it
  gives only smoothing, Sobel edges of the smoothed image and the Hessian eigenvalues, with
  no Laplacian of Gaussian, DoG or structure tensor, and not with ilastik's kernels.
- for a ViT backbone, its cached patch tokens upsampled bilinearly to the pixel grid
  (``tokens_at``: exactly ``F.interpolate(..., mode="bilinear", align_corners=False)``, but
  evaluated only at the pixels asked for, so a 1024-channel tile is never upsampled whole),
  concatenated with the bank where ``pixelforest.with_filterbank`` says so. For the
  filter-bank backbone the cache is skipped: its tokens are a (different, smaller) bank pooled to patches.

Training draws a seeded, class-balanced sample of labelled pixels (half foreground, half
background, uniformly over the training tiles), computes the bank once per slice and keeps
only the sampled pixels; it logs progress slice by slice and every 10 trees. Prediction
computes each slice's bank once and, without tokens, predicts every pixel once in bounded
chunks (``slice_probability``). A forest trained on balanced classes over-predicts the rarer
foreground, so its probability is calibrated (``pixelforest.calibration``): ``prior``
corrects it for the training prior by Bayes' rule (the log-odds shift log(pi/(1-pi)) -
log(pi_s/(1-pi_s)), pi the foreground fraction of the labelled training pixels, pi_s that of
the sample); ``validation`` chooses the decision threshold that maximises foreground IoU on
the validation tiles. Both become one log-odds shift the segmenter adds, so evaluation's 0.5
threshold on its output is the calibrated decision; model and run.json record which, the
shift and the threshold on the forest's raw probability.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.ensemble import RandomForestClassifier
from torch import nn

from em_foundation.backbones.filterbank import ILASTIK_SCALES, ilastik_channel_names, ilastik_features
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.data.splits import labelled_subset
from em_foundation.data.tiles import TileSet, read_tiles
from em_foundation.evaluation.decision import best_threshold
from em_foundation.feature_cache import check_cache_matches_tiles, read_tokens, to_unit_float
from em_foundation.io import atomic_path, read_json, write_csv, write_json
from em_foundation.runtime import seed_everything
from em_foundation.training.forest import fitted_run_record
from em_foundation.training.losses import soft_dice_loss

DEFAULT_SIGMAS = ILASTIK_SCALES  # ilastik's default scales, 0.3 to 10 px
CALIBRATIONS = ("prior", "validation")
CHUNK_VALUES = 2**24  # features held at once while predicting (floats): 64 MB
_EPS = 1e-6


def bank_channel_names(sigmas: Sequence[float]) -> list[str]:
    return ilastik_channel_names(sigmas)


def pixel_bank(image: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> np.ndarray:
    """(H, W) image in [0, 1] to (C, H, W) float32 filter responses, ``bank_channel_names`` order."""
    return ilastik_features(image, sigmas)


def assemble_slice(tiles: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One slice's (n, h, w) tiles put back at their (y, x) positions: the slice they were cut from.

    Tiles are crops of one slice (overlaps hold the same pixels), so this is that slice
    exactly; for a slice smaller than a tile, its reflection padding too (data/tile_grid.py).
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    height, width = tiles.shape[-2:]
    canvas = np.zeros((int(positions[:, 0].max()) + height, int(positions[:, 1].max()) + width), tiles.dtype)
    for tile, (y, x) in zip(tiles, positions):
        canvas[y : y + height, x : x + width] = tile
    return canvas


def tile_positions(tile_set: TileSet) -> np.ndarray:
    """(y, x) of each tile of one slice, in the order the tiles file stores a slice's tiles."""
    if tile_set.mode == "resize":
        return np.zeros((1, 2), dtype=np.int64)
    return np.asarray(tile_set.grid.positions, dtype=np.int64)


def tokens_at(tokens: np.ndarray, flat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, h, w) tokens bilinearly upsampled to ``shape`` and read at the flat pixel indices: (N, C).

    Equal to ``F.interpolate(tokens, shape, mode="bilinear", align_corners=False)`` at those
    pixels: interpolate's source coordinate (i + 0.5) h / H - 0.5, clamped at the border, is
    grid_sample's normalised 2 (i + 0.5) / H - 1 with border padding.
    """
    rows, cols = np.divmod(flat, shape[1])
    grid = np.stack([2 * (cols + 0.5) / shape[1] - 1, 2 * (rows + 0.5) / shape[0] - 1], axis=-1)
    source = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))[None]
    points = torch.from_numpy(grid.astype(np.float32))[None, None]
    sampled = F.grid_sample(source, points, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[0, :, 0].T.numpy()


@dataclass(frozen=True)
class PixelFeatures:
    """Which features a pixel gets: the filter bank at ``sigmas`` and/or upsampled tokens.

    The bank is computed on the whole slice (``slice_bank``), never on a tile alone: a tile's
    border would otherwise see mirrored pixels where ilastik sees the slice.
    """

    sigmas: tuple[float, ...]
    bank: bool
    token_channels: int  # 0: no tokens

    @property
    def n_channels(self) -> int:
        return (len(bank_channel_names(self.sigmas)) if self.bank else 0) + self.token_channels

    def slice_bank(self, pixels: np.ndarray) -> np.ndarray | None:
        """The bank of one whole (H, W) slice in [0, 1], (C, H, W); None without a bank."""
        return pixel_bank(pixels, self.sigmas) if self.bank else None

    def at(
        self,
        bank: np.ndarray | None,
        tokens: np.ndarray | None,
        flat: np.ndarray,
        shape: tuple[int, int],
        offset: tuple[int, int] = (0, 0),
    ) -> np.ndarray:
        """(N, channels) float32 features of the flat pixel indices of one (h, w) tile at
        ``offset`` (y, x) on the slice whose bank is ``bank``."""
        parts = []
        if self.token_channels:
            if tokens is None or tokens.shape[0] != self.token_channels:
                raise ValueError(
                    f"pixelforest needs {self.token_channels}-channel tokens, got {getattr(tokens, 'shape', None)}"
                )
            parts.append(tokens_at(tokens, flat, shape))
        if bank is not None:
            rows, cols = np.divmod(flat, shape[1])
            parts.append(bank[:, rows + offset[0], cols + offset[1]].T)
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


def forest_probability(forest: RandomForestClassifier, features: np.ndarray) -> np.ndarray:
    """The forest's foreground probability of each row (0 where it never saw foreground)."""
    probability = forest.predict_proba(features)
    classes = list(forest.classes_.astype(int))
    return probability[:, classes.index(1)] if 1 in classes else np.zeros(len(features))


def _chunked_probability(forest: RandomForestClassifier, n_channels: int, n: int, features_of) -> np.ndarray:
    """Forest probability of n rows, ``features_of(start, stop)`` at a time (bounded memory)."""
    chunk = max(1, CHUNK_VALUES // max(n_channels, 1))
    parts = [forest_probability(forest, features_of(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    return np.concatenate(parts) if parts else np.zeros(0)


def slice_probability(
    forest: RandomForestClassifier,
    spec: PixelFeatures,
    tiles: np.ndarray,
    positions: np.ndarray,
    tokens: np.ndarray | None = None,
    flats: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Raw forest probability of one slice's (n, h, w) tiles in [0, 1], tile by tile: all pixels
    ((h, w) each) or, with ``flats``, those flat indices of each tile.

    The bank is computed once on the assembled slice. Without tokens every pixel of the
    slice is predicted once and the tiles are crops of that map; with tokens (which are per
    tile) each tile's pixels are predicted with its own tokens.
    """
    shape = tuple(tiles.shape[-2:])
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    bank = spec.slice_bank(assemble_slice(tiles, positions))
    if not spec.token_channels:
        height, width = bank.shape[1:]
        flat_bank = bank.reshape(bank.shape[0], -1)
        whole = _chunked_probability(
            forest, spec.n_channels, height * width, lambda a, b: np.ascontiguousarray(flat_bank[:, a:b].T)
        ).reshape(height, width)
        crops = [whole[y : y + shape[0], x : x + shape[1]] for y, x in positions]
        return [c.ravel()[f] for c, f in zip(crops, flats)] if flats is not None else crops
    out = []
    for k, (y, x) in enumerate(positions):
        flat = np.arange(shape[0] * shape[1]) if flats is None else flats[k]
        probability = _chunked_probability(
            forest, spec.n_channels, len(flat), lambda a, b: spec.at(bank, tokens[k], flat[a:b], shape, (y, x))
        )
        out.append(probability.reshape(shape) if flats is None else probability)
    return out


class PixelForestSegmenter(nn.Module):
    """A fitted per-pixel forest that evaluation calls like the torch segmenters.

    ``predict_slice`` (what evaluation calls: evaluation/evaluate.py predict_image) takes all
    tiles of one slice and computes the bank once on the whole slice; ``forward`` takes tiles
    alone (B, 1, H, W) in [0, 1] and, for a token-fed forest, their tokens, and computes the
    bank on each tile as if it were a slice. Both return (B, 2, H, W) log-probabilities whose
    softmax crosses 0.5 at the calibrated decision.
    """

    def __init__(self, forest: RandomForestClassifier, spec: PixelFeatures, log_odds_shift: float) -> None:
        super().__init__()
        self.forest, self.spec, self.log_odds_shift = forest, spec, float(log_odds_shift)

    def calibrated(self, probability: np.ndarray) -> np.ndarray:
        """Foreground log-odds after the calibration shift."""
        p = np.clip(probability, _EPS, 1 - _EPS)
        return np.log(p) - np.log1p(-p) + self.log_odds_shift

    def _log_probs(self, probabilities: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
        logits = torch.from_numpy(np.stack([self.calibrated(p) for p in probabilities]).astype(np.float32))
        return F.log_softmax(torch.stack([torch.zeros_like(logits), logits], dim=1), dim=1).to(like.device)

    def predict_slice(
        self, pixels: torch.Tensor, positions: np.ndarray, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All (n, 1, h, w) tiles of one slice, at their (y, x) ``positions``: (n, 2, h, w)."""
        tiles = pixels[:, 0].detach().float().cpu().numpy()
        grids = tokens.detach().float().cpu().numpy() if tokens is not None else None
        return self._log_probs(slice_probability(self.forest, self.spec, tiles, positions, grids), pixels)

    def forward(
        self, pixels: torch.Tensor, out_size: tuple[int, int], tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != tuple(out_size):
            raise ValueError(f"pixelforest predicts at the tile's pixels {tuple(pixels.shape[-2:])}, asked {out_size}")
        images = pixels[:, 0].detach().float().cpu().numpy()
        grids = tokens.detach().float().cpu().numpy() if tokens is not None else [None] * len(images)
        origin = np.zeros((1, 2), dtype=np.int64)
        probabilities = [
            slice_probability(self.forest, self.spec, image[None], origin, None if grid is None else grid[None])[0]
            for image, grid in zip(images, grids)
        ]
        return self._log_probs(probabilities, pixels)


def logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return float(np.log(p) - np.log1p(-p))


def sample_pixels(labels: np.ndarray, per_tile: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Class-balanced seeded sample of labelled pixels: flat indices per tile.

    ``per_tile`` × tiles pixels in all, half of each class drawn uniformly without replacement
    over every labelled pixel of that class (the multivariate hypergeometric says how many
    come from each tile); a class with fewer pixels than its half gives all it has.
    """
    flat = labels.reshape(len(labels), -1)
    chosen: list[list[np.ndarray]] = [[] for _ in flat]
    half = per_tile * len(flat) // 2
    for value in (0, 1):
        counts = (flat == value).sum(axis=1)
        take = rng.multivariate_hypergeometric(counts, min(half, int(counts.sum())))
        for tile, n in enumerate(take):
            if n:
                chosen[tile].append(rng.choice(np.flatnonzero(flat[tile] == value), size=n, replace=False))
    return [np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64) for parts in chosen]


@dataclass
class SplitTiles:
    """One dataset's training tiles, split into train and validation by the run's split file."""

    dataset: str
    tile_set: TileSet
    features: str | None
    is_train: np.ndarray
    is_val: np.ndarray
    record: dict[str, Any]


def split_tiles(
    dataset: str, tiles: str, features: str | None, split_path: str, n_train_slices: str, seed: int
) -> SplitTiles:
    """The same train/validation assignment as training.run.load_training_data (split file,
    dropped slices, label-efficiency subset), without reading any tokens."""
    tile_set = read_tiles(tiles, "train")
    if features is not None:
        check_cache_matches_tiles(features, tiles)
    split = read_json(split_path)
    val_names = set(split["val"])
    train_list = split.get("train", [n for n in tile_set.names if n not in val_names])
    labelled = labelled_subset(train_list, n_train_slices, seed)
    is_val = np.array([tile_set.names[i] in val_names for i in tile_set.image_index])
    is_train = np.array([tile_set.names[i] in set(labelled) for i in tile_set.image_index])
    record = {
        "val_slices": split["val"],
        "dropped_slices": split.get("dropped", []),
        "labelled_slices": labelled,
        "train_tiles": int(is_train.sum()),
        "val_tiles": int(is_val.sum()),
    }
    return SplitTiles(dataset, tile_set, features, is_train, is_val, record)


def _tokens_of(part: SplitTiles, indices: np.ndarray) -> np.ndarray | None:
    return None if part.features is None else read_tokens(part.features, "train", np.asarray(indices))


def _unit(raw: np.ndarray) -> np.ndarray:
    """uint8 tiles to float32 in [0, 1], exactly as evaluation feeds them (feature_cache.to_unit_float)."""
    return to_unit_float(raw[:, None])[:, 0].numpy()


def _slices_of(part: SplitTiles, mask: np.ndarray) -> list[np.ndarray]:
    """Tile indices of each slice with tiles in ``mask``, slice by slice (all of a slice's tiles
    are in one split: splits are by slice)."""
    indices = np.flatnonzero(mask)
    images = part.tile_set.image_index[indices]
    return [indices[images == image] for image in np.unique(images)]


def _slice_bank(part: SplitTiles, spec: PixelFeatures, tiles: np.ndarray) -> np.ndarray | None:
    """The bank of the slice that ``tiles`` (one slice's tile indices, all of them) were cut from."""
    positions = part.tile_set.positions[tiles]
    return spec.slice_bank(assemble_slice(_unit(part.tile_set.raw[tiles]), positions))


def _log(message: str) -> None:
    """A progress line on stdout, which the rule sends to its log."""
    print(message, flush=True)


def make_forest(options: dict[str, Any], seed: int, threads: int) -> RandomForestClassifier:
    """The forest ``pixelforest`` options describe (max_features: sklearn's, default sqrt)."""
    return RandomForestClassifier(
        n_estimators=int(options["n_estimators"]),
        max_depth=options["max_depth"],
        min_samples_leaf=int(options["min_samples_leaf"]),
        max_features=options.get("max_features", "sqrt"),
        random_state=seed,
        n_jobs=threads,
        verbose=0,
    )


def sample_features(
    parts: list[SplitTiles], spec: PixelFeatures, options: dict[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A class-balanced sample of training pixels and their features, the bank computed once per slice."""
    rng = np.random.default_rng(seed)
    features, classes = [], []
    labelled = foreground = 0
    started = time.perf_counter()
    for part in parts:
        indices = np.flatnonzero(part.is_train)
        labels = part.tile_set.labels[indices]
        labelled += int((labels != IGNORE_LABEL).sum())
        foreground += int((labels == 1).sum())
        chosen = dict(zip(indices, sample_pixels(labels, int(options["pixels_per_tile"]), rng)))
        slices = _slices_of(part, part.is_train)
        for n, tiles in enumerate(slices):
            bank = _slice_bank(part, spec, tiles)
            tokens = _tokens_of(part, tiles)
            for k, index in enumerate(tiles):
                if len(chosen[index]):
                    top, left = part.tile_set.positions[index]
                    grid = None if tokens is None else tokens[k]
                    features.append(spec.at(bank, grid, chosen[index], part.tile_set.tile_shape, (top, left)))
                    classes.append(part.tile_set.labels[index].ravel()[chosen[index]])
            if (n + 1) % 10 == 0 or n + 1 == len(slices):
                _log(
                    f"pixelforest features: {part.dataset} slice {n + 1}/{len(slices)}, "
                    f"{sum(map(len, classes))} pixels, {time.perf_counter() - started:.0f} s"
                )
    if not features:
        raise ValueError("pixelforest: the training tiles have no labelled pixels to sample")
    y = np.concatenate(classes)
    sample = {
        "pixels_sampled": int(len(y)),
        "sample_prior": float(y.mean()),
        "train_prior": foreground / max(labelled, 1),
    }
    return np.concatenate(features), y, sample


def fit_pixel_forest(
    parts: list[SplitTiles], spec: PixelFeatures, options: dict[str, Any], seed: int, threads: int = 1
) -> tuple[RandomForestClassifier, dict[str, Any]]:
    """Fit on a class-balanced sample of training pixels, logging progress tree batch by batch."""
    x, y, sample = sample_features(parts, spec, options, seed)
    forest = make_forest(options, seed, threads)
    total = forest.n_estimators
    step = max(1, min(total, 10))
    started = time.perf_counter()
    # warm_start grows the same forest as one fit would (each tree's seed is drawn from
    # random_state in order), so logging between batches changes no tree.
    forest.set_params(warm_start=True)
    for grown in range(step, total + step, step):
        forest.set_params(n_estimators=min(grown, total))
        forest.fit(x, y)
        _log(
            f"pixelforest fit: {forest.n_estimators}/{total} trees on {len(y)} pixels x {x.shape[1]} features, "
            f"{time.perf_counter() - started:.0f} s"
        )
    forest.set_params(warm_start=False)
    return forest, sample


def validation_probability(
    forest: RandomForestClassifier, parts: list[SplitTiles], spec: PixelFeatures
) -> tuple[np.ndarray, np.ndarray]:
    """Raw probability and label of every labelled validation pixel (of each tile, as evaluation tiles them)."""
    probabilities, truths = [np.zeros(0)], [np.zeros(0, np.uint8)]
    for part in parts:
        for tiles in _slices_of(part, part.is_val):
            labels = part.tile_set.labels[tiles].reshape(len(tiles), -1)
            flats = [np.flatnonzero(row != IGNORE_LABEL) for row in labels]
            probabilities.extend(
                slice_probability(
                    forest,
                    spec,
                    _unit(part.tile_set.raw[tiles]),
                    part.tile_set.positions[tiles],
                    _tokens_of(part, tiles),
                    flats,
                )
            )
            truths.extend(row[flat] for row, flat in zip(labels, flats))
    return np.concatenate(probabilities), np.concatenate(truths)


def calibrate(
    calibration: str, sample: dict[str, Any], val_probability: np.ndarray, val_truth: np.ndarray
) -> dict[str, Any]:
    """The log-odds shift of the configured calibration, and the raw-probability threshold it means."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"pixelforest.calibration {calibration!r} is not one of {', '.join(CALIBRATIONS)}")
    applied, val_iou = calibration, None
    if calibration == "validation" and (val_truth == 1).any():
        threshold, val_iou = best_threshold(val_probability, val_truth)
        shift = -logit(threshold)
    else:
        # no validation foreground to choose a threshold on: fall back to the prior correction
        applied = "prior" if calibration == "prior" else "prior (no foreground in the validation tiles)"
        shift = logit(sample["train_prior"]) - logit(sample["sample_prior"])
    return {
        "calibration": calibration,
        "calibration_applied": applied,
        "log_odds_shift": float(shift),
        "threshold": float(1 / (1 + np.exp(shift))),
        "val_fg_iou_at_threshold": val_iou,
    }


def train_pixelforest_run(
    *,
    backbone_name: str,
    train_set: str,
    datasets: list[str],
    seed: int,
    pixelforest: dict[str, Any],
    tiles: dict[str, str],
    features: dict[str, str] | None,
    splits: dict[str, str],
    threads: int,
    alignment: str = "none",
    out_model: Path,
    out_log: Path,
    out_run: Path,
    n_train_slices: str = "all",
) -> dict[str, Any]:
    """Train one pixelforest run and write model.pt, train_log.csv and run.json.

    ``features`` (the cache of each dataset) is given for a ViT backbone and None for the
    filter bank, whose pooled tokens this regime recomputes per pixel.
    """
    started = time.perf_counter()
    seed_everything(seed)
    parts = [
        split_tiles(d, tiles[d], features[d] if features else None, splits[d], str(n_train_slices), seed)
        for d in datasets
    ]
    token_channels = 0
    if features:
        token_channels = int(read_tokens(features[datasets[0]], "train", np.array([0])).shape[1])
    spec = PixelFeatures(
        sigmas=tuple(float(s) for s in pixelforest["sigmas"]),
        bank=bool(pixelforest["with_filterbank"]) or not features,
        token_channels=token_channels,
    )
    if spec.n_channels == 0:
        raise ValueError(
            "pixelforest: no features (no tokens and with_filterbank false); set pixelforest.with_filterbank"
        )
    forest, sample = fit_pixel_forest(parts, spec, pixelforest, seed, threads)
    val_probability, val_truth = validation_probability(forest, parts, spec)
    calibration = calibrate(pixelforest["calibration"], sample, val_probability, val_truth)
    segmenter = PixelForestSegmenter(forest, spec, calibration["log_odds_shift"])
    val_loss = float("nan")
    if len(val_truth):
        logits = torch.from_numpy(segmenter.calibrated(val_probability).astype(np.float32))
        log_probs = F.log_softmax(torch.stack([torch.zeros_like(logits), logits])[None, :, None], dim=1)
        val_loss = float(soft_dice_loss(log_probs, torch.from_numpy(val_truth.astype(np.int64))[None, None]))
    seconds = time.perf_counter() - started
    # The loss on the training split would need every training pixel predicted: not computed.
    history = pd.DataFrame(
        [
            {
                "epoch": 1,
                "train_loss": float("nan"),
                "val_loss": val_loss,
                "lr": float("nan"),
                "improved": True,
                "seconds": seconds,
            }
        ]
    )
    snapshot = {
        "regime": "pixelforest",
        "backbone_name": backbone_name,
        "train_set": train_set,
        "datasets": datasets,
        "seed": seed,
        "pixelforest": pixelforest,
        "head": None,
        "lora": None,
        "alignment": alignment,
        "n_train_slices": str(n_train_slices),
    }
    features_record = {"channels": spec.n_channels, "token_channels": spec.token_channels, "filterbank": spec.bank}
    with atomic_path(out_model, suffix=".pt") as tmp:
        torch.save(
            {
                "regime": "pixelforest",
                "forest": forest,
                "features": {"sigmas": list(spec.sigmas), "bank": spec.bank, "token_channels": spec.token_channels},
                "calibration": calibration,
                "config": snapshot,
            },
            tmp,
        )
    write_csv(history, out_log)
    data = {part.dataset: part.record for part in parts}
    record = fitted_run_record(snapshot, data, val_loss, started, **sample, **calibration, features=features_record)
    write_json(out_run, record)
    return record


def load_pixel_forest(saved: dict[str, Any]) -> PixelForestSegmenter:
    spec = PixelFeatures(
        sigmas=tuple(saved["features"]["sigmas"]),
        bank=bool(saved["features"]["bank"]),
        token_channels=int(saved["features"]["token_channels"]),
    )
    return PixelForestSegmenter(saved["forest"], spec, saved["calibration"]["log_odds_shift"]).eval()
