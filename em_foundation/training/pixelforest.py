"""The ``pixelforest`` regime: a random forest on per-pixel features, as ilastik classifies pixels.

Why: the ``forest`` regime classifies 8×8 (or 14×14, 16×16) patch tokens and upsamples the
probabilities, so no structure thinner than a patch survives. ilastik's baseline is a forest
on filter responses *per pixel*; this regime measures that, and the same forest on VFM
tokens upsampled to the pixel grid (napari-convpaint, FeatureForest), beside the others.

Features, per pixel of a tile at the tile's full resolution, computed on the fly from the
tiles and never cached (a per-pixel cache of Lucchi++ would be tens of GB):

- the filter bank (``pixel_bank``): ilastik's default set, i.e. raw intensity and, per scale
  sigma, Gaussian smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, the two
  Hessian-of-Gaussian eigenvalues, the two structure-tensor eigenvalues (from the project's
  own ``backbones/filterbank.pixel_features``, its per-pixel responses before pooling) plus
  the difference of Gaussians G(sigma) - G(0.66 sigma) (ilastik's ratio), which the backbone's
  bank lacks. Why not scikit-image's ``multiscale_basic_features``: it is faster (0.67 s
  against 1.65 s for six scales of one 768×1024 slice, measured here) but not equivalent: it
  gives only smoothing, Sobel edges of the smoothed image and the Hessian eigenvalues
  (4 channels per scale), with no Laplacian of Gaussian, DoG or structure tensor.
- for a ViT backbone, its cached patch tokens upsampled bilinearly to the pixel grid
  (``tokens_at``: exactly ``F.interpolate(..., mode="bilinear", align_corners=False)``, but
  evaluated only at the pixels asked for, so a 1024-channel tile is never upsampled whole),
  concatenated with the bank where ``pixelforest.with_filterbank`` says so. For the
  filter-bank backbone the cache is skipped: its tokens are this bank pooled to patches.

Training draws a seeded, class-balanced sample of labelled pixels (half foreground, half
background, uniformly over the training tiles), computes features tile by tile and keeps
only the sampled pixels. A forest trained on balanced classes over-predicts the rarer
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
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier
from torch import nn

from em_foundation.backbones.filterbank import FILTERS_PER_SCALE, channel_names, pixel_features
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.data.splits import labelled_subset
from em_foundation.data.tiles import TileSet, read_tiles
from em_foundation.evaluation.decision import best_threshold
from em_foundation.feature_cache import check_cache_matches_tiles, read_tokens, to_unit_float
from em_foundation.io import atomic_path, read_json, write_csv, write_json
from em_foundation.runtime import seed_everything
from em_foundation.training.forest import fitted_run_record
from em_foundation.training.losses import soft_dice_loss

DEFAULT_SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)  # ilastik's default scales from 0.7 to 10 px
DOG_RATIO = 0.66  # ilastik's DoG: G(sigma) - G(0.66 sigma)
CALIBRATIONS = ("prior", "validation")
CHUNK_VALUES = 2**24  # features held at once while predicting a tile (floats): 64 MB
_EPS = 1e-6


def bank_channel_names(sigmas: Sequence[float]) -> list[str]:
    return channel_names(sigmas) + [f"dog@{float(s):g}" for s in sigmas]


def pixel_bank(image: np.ndarray, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> np.ndarray:
    """(H, W) image in [0, 1] to (C, H, W) float32 filter responses, ``bank_channel_names`` order."""
    features = pixel_features(image, sigmas)
    smooth = features[1 :: len(FILTERS_PER_SCALE)]  # the Gaussian channel of each scale (after raw)
    image = np.ascontiguousarray(image, dtype=np.float32)
    dog = [
        smooth[k] - ndimage.gaussian_filter(image, DOG_RATIO * float(s), mode="reflect", output=np.float32)
        for k, s in enumerate(sigmas)
    ]
    return np.concatenate([features, np.stack(dog)]) if dog else features


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
    """Which features a pixel gets: the filter bank at ``sigmas`` and/or upsampled tokens."""

    sigmas: tuple[float, ...]
    bank: bool
    token_channels: int  # 0: no tokens

    @property
    def n_channels(self) -> int:
        return (len(bank_channel_names(self.sigmas)) if self.bank else 0) + self.token_channels

    def tile_bank(self, pixels: np.ndarray) -> np.ndarray | None:
        """The bank of one (H, W) tile in [0, 1], flattened to (C, H·W); None without a bank."""
        return pixel_bank(pixels, self.sigmas).reshape(-1, pixels.size) if self.bank else None

    def at(
        self, bank: np.ndarray | None, tokens: np.ndarray | None, flat: np.ndarray, shape: tuple[int, int]
    ) -> np.ndarray:
        """(N, channels) float32 features of the flat pixel indices of one tile."""
        parts = []
        if self.token_channels:
            if tokens is None or tokens.shape[0] != self.token_channels:
                raise ValueError(
                    f"pixelforest needs {self.token_channels}-channel tokens, got {getattr(tokens, 'shape', None)}"
                )
            parts.append(tokens_at(tokens, flat, shape))
        if bank is not None:
            parts.append(bank[:, flat].T)
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


def forest_probability(forest: RandomForestClassifier, features: np.ndarray) -> np.ndarray:
    """The forest's foreground probability of each row (0 where it never saw foreground)."""
    probability = forest.predict_proba(features)
    classes = list(forest.classes_.astype(int))
    return probability[:, classes.index(1)] if 1 in classes else np.zeros(len(features))


def tile_probability(
    forest: RandomForestClassifier,
    spec: PixelFeatures,
    pixels: np.ndarray,
    tokens: np.ndarray | None,
    flat: np.ndarray | None = None,
) -> np.ndarray:
    """Raw forest probability of one (H, W) tile's pixels (all, or the flat indices), in chunks."""
    shape = pixels.shape
    bank = spec.tile_bank(pixels)
    flat = np.arange(pixels.size) if flat is None else flat
    chunk = max(1, CHUNK_VALUES // max(spec.n_channels, 1))
    return np.concatenate(
        [
            forest_probability(forest, spec.at(bank, tokens, flat[i : i + chunk], shape))
            for i in range(0, len(flat), chunk)
        ]
        or [np.zeros(0)]
    )


class PixelForestSegmenter(nn.Module):
    """A fitted per-pixel forest that evaluation calls like the torch segmenters.

    Takes the tile's pixels (B, 1, H, W) in [0, 1] and, for a token-fed forest, its tokens;
    returns (B, 2, H, W) log-probabilities whose softmax crosses 0.5 at the calibrated decision.
    """

    def __init__(self, forest: RandomForestClassifier, spec: PixelFeatures, log_odds_shift: float) -> None:
        super().__init__()
        self.forest, self.spec, self.log_odds_shift = forest, spec, float(log_odds_shift)

    def calibrated(self, probability: np.ndarray) -> np.ndarray:
        """Foreground log-odds after the calibration shift."""
        p = np.clip(probability, _EPS, 1 - _EPS)
        return np.log(p) - np.log1p(-p) + self.log_odds_shift

    def forward(
        self, pixels: torch.Tensor, out_size: tuple[int, int], tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != tuple(out_size):
            raise ValueError(f"pixelforest predicts at the tile's pixels {tuple(pixels.shape[-2:])}, asked {out_size}")
        images = pixels[:, 0].detach().float().cpu().numpy()
        grids = tokens.detach().float().cpu().numpy() if tokens is not None else [None] * len(images)
        logits = np.stack(
            [
                self.calibrated(tile_probability(self.forest, self.spec, image, grid))
                for image, grid in zip(images, grids)
            ]
        ).reshape(len(images), *images.shape[1:])
        logits = torch.from_numpy(logits.astype(np.float32))
        return F.log_softmax(torch.stack([torch.zeros_like(logits), logits], dim=1), dim=1).to(pixels.device)


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


def _tokens_of(part: SplitTiles, index: int) -> np.ndarray | None:
    return None if part.features is None else read_tokens(part.features, "train", np.array([index]))[0]


def _unit(raw: np.ndarray) -> np.ndarray:
    """uint8 tile to float32 in [0, 1], exactly as evaluation feeds it (feature_cache.to_unit_float)."""
    return to_unit_float(raw[None])[0, 0].numpy()


def fit_pixel_forest(
    parts: list[SplitTiles], spec: PixelFeatures, options: dict[str, Any], seed: int, threads: int = 1
) -> tuple[RandomForestClassifier, dict[str, Any]]:
    """Fit on a class-balanced sample of training pixels, computing features tile by tile."""
    rng = np.random.default_rng(seed)
    features, classes = [], []
    labelled = foreground = 0
    for part in parts:
        indices = np.flatnonzero(part.is_train)
        labels = part.tile_set.labels[indices]
        labelled += int((labels != IGNORE_LABEL).sum())
        foreground += int((labels == 1).sum())
        for index, chosen in zip(indices, sample_pixels(labels, int(options["pixels_per_tile"]), rng)):
            if len(chosen):
                pixels = _unit(part.tile_set.raw[index])
                bank = spec.tile_bank(pixels)
                features.append(spec.at(bank, _tokens_of(part, index), chosen, pixels.shape))
                classes.append(part.tile_set.labels[index].ravel()[chosen])
    if not features:
        raise ValueError("pixelforest: the training tiles have no labelled pixels to sample")
    y = np.concatenate(classes)
    forest = RandomForestClassifier(
        n_estimators=int(options["n_estimators"]),
        max_depth=options["max_depth"],
        min_samples_leaf=int(options["min_samples_leaf"]),
        random_state=seed,
        n_jobs=threads,
    )
    forest.fit(np.concatenate(features), y)
    return forest, {
        "pixels_sampled": int(len(y)),
        "sample_prior": float(y.mean()),
        "train_prior": foreground / max(labelled, 1),
    }


def validation_probability(
    forest: RandomForestClassifier, parts: list[SplitTiles], spec: PixelFeatures
) -> tuple[np.ndarray, np.ndarray]:
    """Raw probability and label of every labelled validation pixel."""
    probabilities, truths = [np.zeros(0)], [np.zeros(0, np.uint8)]
    for part in parts:
        for index in np.flatnonzero(part.is_val):
            labels = part.tile_set.labels[index].ravel()
            flat = np.flatnonzero(labels != IGNORE_LABEL)
            pixels = _unit(part.tile_set.raw[index])
            probabilities.append(tile_probability(forest, spec, pixels, _tokens_of(part, index), flat))
            truths.append(labels[flat])
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
