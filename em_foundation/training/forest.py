"""The ``forest`` regime: a random forest on cached patch tokens, as interactive pixel
classification (ilastik) trains a shallow learner on filter responses.

Each token is labelled by the majority class of the pixels it covers; a sample of tokens
per tile (sparse, like brush-stroke annotations) trains the forest; at test time every
token's probability is upsampled bilinearly to the tile and stitched like any other
segmenter's output.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.ensemble import RandomForestClassifier
from torch import nn

from em_foundation.backbones.frame import frame_to_native, labels_to_frame
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.io import atomic_path, write_csv, write_json
from em_foundation.runtime import seed_everything
from em_foundation.training.losses import dice_sums


def token_labels(labels: np.ndarray, patch_size: int, input_frame: int | None = None) -> np.ndarray:
    """(N, T, T) pixel labels to (N, T/p, T/p) token labels: majority foreground, or IGNORE.

    ``input_frame``: the tokens are of SAM's padded frame (backbones/frame.py), so the labels
    go into the frame as the images did first; the padding's tokens are IGNORE.
    """
    if input_frame is not None:
        labels = labels_to_frame(torch.from_numpy(np.ascontiguousarray(labels)), input_frame, IGNORE_LABEL).numpy()
    n, height, width = labels.shape
    blocks = labels.reshape(n, height // patch_size, patch_size, width // patch_size, patch_size)
    valid = (blocks != IGNORE_LABEL).sum(axis=(2, 4))
    foreground = (blocks == 1).sum(axis=(2, 4))
    result = (2 * foreground > valid).astype(np.uint8)
    result[2 * valid < patch_size * patch_size] = IGNORE_LABEL
    return result


class ForestSegmenter(nn.Module):
    """Wraps a fitted forest so that evaluation treats it like the torch segmenters."""

    def __init__(self, forest: RandomForestClassifier, input_frame: int | None = None) -> None:
        super().__init__()
        self.forest = forest
        self.input_frame = input_frame  # tokens of SAM's padded frame: mapped back, not stretched

    def forward(self, tokens: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        batch, channels, height, width = tokens.shape
        flat = tokens.float().permute(0, 2, 3, 1).reshape(-1, channels).cpu().numpy()
        probability = np.zeros((len(flat), 2), dtype=np.float32)
        probability[:, self.forest.classes_.astype(int)] = self.forest.predict_proba(flat)
        grid = torch.from_numpy(probability).reshape(batch, height, width, 2).permute(0, 3, 1, 2)
        if self.input_frame is not None:
            grid = frame_to_native(grid, tuple(out_size), self.input_frame)
        else:
            grid = F.interpolate(grid, size=out_size, mode="bilinear", align_corners=False)
        return torch.log(grid.clamp_min(1e-6)).to(tokens.device)


# Tiles read at a time while sampling: the forest keeps only the sampled tokens of each.
SAMPLE_CHUNK_TILES = 32


def fit_forest(
    tokens: Any,
    labels: Any,
    patch_size: int,
    forest: dict[str, Any],
    seed: int,
    threads: int = 1,
    chunk_tiles: int = SAMPLE_CHUNK_TILES,
    input_frame: int | None = None,
) -> tuple[RandomForestClassifier, int]:
    """Fit on a seeded sample of labelled tokens; returns the forest and the sample size.

    ``tokens`` and ``labels`` may be arrays or rows read from disk (data/streaming.StoredRows):
    they are read ``chunk_tiles`` tiles at a time and only the sampled tokens are kept, so
    memory holds the sample, not the split. Tiles are visited in order with one generator,
    so the sample (and the forest) does not depend on ``chunk_tiles``.
    """
    rng = np.random.default_rng(seed)
    features, classes = [], []
    for start in range(0, len(labels), max(1, chunk_tiles)):
        chunk_tokens = np.asarray(tokens[start : start + chunk_tiles])
        targets = token_labels(np.asarray(labels[start : start + chunk_tiles]), patch_size, input_frame)
        for tile_tokens, tile_targets in zip(chunk_tokens, targets):
            flat_tokens = tile_tokens.reshape(tile_tokens.shape[0], -1).T
            flat_targets = tile_targets.ravel()
            labelled = np.flatnonzero(flat_targets != IGNORE_LABEL)
            chosen = rng.choice(labelled, size=min(forest["tokens_per_tile"], len(labelled)), replace=False)
            features.append(flat_tokens[chosen])
            classes.append(flat_targets[chosen])
    model = RandomForestClassifier(
        n_estimators=forest["n_estimators"],
        max_depth=forest["max_depth"],
        min_samples_leaf=forest["min_samples_leaf"],
        random_state=seed,
        n_jobs=threads,
    )
    x, y = np.concatenate(features).astype(np.float32), np.concatenate(classes)
    model.fit(x, y)
    return model, len(y)


def soft_dice_in_batches(
    segmenter: nn.Module, data: Any, batch_size: int = SAMPLE_CHUNK_TILES, eps: float = 1.0
) -> float:
    """training.losses.soft_dice_loss over a whole split, its sums accumulated batch by batch.

    The Dice sums run over every tile of the split (as one call on the whole split would),
    but only one batch of tokens and tile-sized probabilities is in memory at a time.
    """
    intersection = total = None
    with torch.no_grad():
        for inputs, labels in data.batches(slice(s, s + batch_size) for s in range(0, len(data), batch_size)):
            logits = segmenter(inputs, tuple(labels.shape[-2:]))
            sums = dice_sums(logits, labels)
            intersection = sums[0] if intersection is None else intersection + sums[0]
            total = sums[1] if total is None else total + sums[1]
    if intersection is None:
        return float("nan")
    return float(1 - ((2 * intersection + eps) / (total + eps)).mean())


def fitted_run_record(
    snapshot: dict[str, Any], data: dict[str, Any], val_loss: float, started: float, **extra: Any
) -> dict[str, Any]:
    """run.json of a fitted forest (token or per-pixel): fitted once, so one "epoch" and no torch
    parameters; ``extra`` holds what the forest itself records (sample, calibration, features)."""
    return {
        **{
            k: snapshot[k]
            for k in ("regime", "backbone_name", "train_set", "datasets", "seed", "alignment", "n_train_slices")
        },
        "n_labelled_slices": sum(len(part["labelled_slices"]) for part in data.values()),
        "n_validation_slices": sum(len(part.get("val_slices", [])) for part in data.values()),
        "balanced": False,
        "best_epoch": 1,
        "best_val_loss": val_loss,
        "epochs_run": 1,
        "stop_reason": "fitted",
        "resumed_from_epoch": 0,
        **extra,
        "trainable_parameters": 0,
        "data": data,
        "seconds": time.perf_counter() - started,
    }


def train_forest_run(
    *,
    backbone_name: str,
    train_set: str,
    datasets: list[str],
    seed: int,
    forest: dict[str, Any],
    train,
    val,
    patch_size: int,
    data_record: dict[str, Any],
    threads: int,
    alignment: str = "none",
    out_model: Path,
    out_log: Path,
    out_run: Path,
    n_train_slices: str = "all",
    input_frame: int | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    seed_everything(seed)
    model, n_samples = fit_forest(
        train.inputs, train.labels, patch_size, forest, seed, threads, input_frame=input_frame
    )
    segmenter = ForestSegmenter(model, input_frame).eval()

    def loss_of(data) -> float:
        return soft_dice_in_batches(segmenter, data)

    history = pd.DataFrame(
        [
            {
                "epoch": 1,
                "train_loss": loss_of(train),
                "val_loss": loss_of(val),
                "lr": float("nan"),
                "improved": True,
                "seconds": time.perf_counter() - started,
            }
        ]
    )
    snapshot = {
        "regime": "forest",
        "backbone_name": backbone_name,
        "train_set": train_set,
        "datasets": datasets,
        "seed": seed,
        "forest": forest,
        "head": None,
        "lora": None,
        "alignment": alignment,
        "n_train_slices": str(n_train_slices),
    }
    with atomic_path(out_model, suffix=".pt") as tmp:
        torch.save(
            {
                "regime": "forest",
                "forest": model,
                "patch_size": patch_size,
                "input_frame": input_frame,
                "in_channels": int(train.inputs.shape[1]),
                "config": snapshot,
            },
            tmp,
        )
    write_csv(history, out_log)
    record = fitted_run_record(
        snapshot,
        data_record,
        float(history["val_loss"].iloc[0]),
        started,
        tokens_sampled=n_samples,
        data_loading=train.loading,
    )
    write_json(out_run, record)
    return record
