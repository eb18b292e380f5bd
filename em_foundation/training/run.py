"""One training run: gather its data, build its segmenter, fit, and write what it produced."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from em_foundation.alignment import domain_stats, domain_stats_from_cache
from em_foundation.backbones.hub import manifest_citation
from em_foundation.backbones.lora import trainable_state_dict
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.data.splits import labelled_subset
from em_foundation.data.streaming import Part, StoredRows, choose_loading
from em_foundation.data.tiles import read_tiles, tiles_provenance
from em_foundation.evaluation.evaluate import choose_on_validation
from em_foundation.families import STANDARDISED_FAMILIES
from em_foundation.feature_cache import check_cache_matches_tiles, read_cache_attrs, to_unit_float
from em_foundation.grid import CACHED_REGIMES, Run, parse_alignment
from em_foundation.io import atomic_path, read_json, write_csv, write_json
from em_foundation.runtime import seed_everything
from em_foundation.training.augment import augmentation_of
from em_foundation.training.recipe import recipe_of
from em_foundation.training.segmenter import build_segmenter
from em_foundation.training.trainer import NonFiniteLoss, TrainingData, TrainingDiverged, fit


def _tokens_to_tensor(tokens: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(tokens))


def load_training_data(
    regime: str,
    datasets: list[str],
    tiles: dict[str, str],
    features: dict[str, str] | None,
    splits: dict[str, str],
    feature_std: bool = False,
    n_train_slices: str = "all",
    seed: int = 0,
    data_in_memory: str = "auto",
) -> tuple[TrainingData, TrainingData, dict[str, Any]]:
    """Training and validation tiles of every dataset in the training set, with their source.

    ``n_train_slices`` (label efficiency): only that many labelled slices of each dataset's
    training split train, a seeded nested subset (data/splits.labelled_subset); validation
    is unchanged, so early stopping sees the same slices at every size.

    ``feature_std`` standardises each dataset's tokens with that dataset's own per-channel
    statistics (per-domain standardisation, computed in a streaming pass over its cache),
    before datasets of different shapes are padded.

    ``data_in_memory`` (compute.data_in_memory): ``auto`` reads both splits whole where they
    fit in the available memory with a margin, and otherwise streams them batch by batch
    from the HDF5 files (data/streaming.py); ``always`` and ``never`` force one or the
    other. The values are the same either way; the choice is printed (job log) and kept in
    ``TrainingData.loading`` (the run record's ``data_loading``).
    """
    cached = regime in CACHED_REGIMES
    parts: dict[str, dict[str, list]] = {part: {"inputs": [], "labels": [], "sources": []} for part in ("train", "val")}
    record: dict[str, Any] = {}
    for dataset in datasets:
        tile_set = read_tiles(tiles[dataset], "train", with_pixels=False, with_labels=False)
        split = read_json(splits[dataset])
        val_names = set(split["val"])
        # A contiguous validation block may drop its neighbours ("dropped"): neither train nor val.
        train_list = split.get("train", [n for n in tile_set.names if n not in val_names])
        labelled = labelled_subset(train_list, n_train_slices, seed)
        train_names = set(labelled)
        is_val = np.array([tile_set.names[i] in val_names for i in tile_set.image_index])
        is_train = np.array([tile_set.names[i] in train_names for i in tile_set.image_index])
        stats = None
        if cached:
            check_cache_matches_tiles(features[dataset], tiles[dataset])
            if feature_std:
                stats = domain_stats_from_cache(features[dataset], "train", dataset=dataset)
        for part, mask in (("train", is_train), ("val", is_val)):
            rows = np.flatnonzero(mask)
            if cached:
                inputs = Part(features[dataset], "train", "tokens", rows, stats)
            else:
                inputs = Part(tiles[dataset], "train", "raw", rows)
            parts[part]["inputs"].append(inputs)
            parts[part]["labels"].append(Part(tiles[dataset], "train", "labels", rows))
            parts[part]["sources"].append(np.full(len(rows), dataset))
        record[dataset] = {
            "val_slices": split["val"],
            "dropped_slices": split.get("dropped", []),
            "labelled_slices": labelled,
            "train_tiles": int(is_train.sum()),
            "val_tiles": int(is_val.sum()),
        }
    to_tensor = _tokens_to_tensor if cached else to_unit_float
    stored = {
        part: (StoredRows(chunks["inputs"], 0), StoredRows(chunks["labels"], IGNORE_LABEL))
        for part, chunks in parts.items()
    }
    needed = sum(inputs.nbytes + labels.nbytes for inputs, labels in stored.values())
    loading = choose_loading(needed, data_in_memory, "the training and validation inputs and labels")
    print(f"training data: {loading['mode']} ({loading['reason']})", flush=True)

    def merge(part: str) -> TrainingData:
        inputs, labels = stored[part]
        if loading["mode"] == "in-memory":
            inputs, labels = inputs[:], labels[:]
        return TrainingData(inputs, labels, np.concatenate(parts[part]["sources"]), to_tensor, loading)

    return merge("train"), merge("val"), record


def _concatenate_padded(arrays, fill) -> np.ndarray:
    """Concatenate along the first axis, padding the last two axes (bottom, right) to a common size.

    (data/streaming.StoredRows pads each batch the same way; this whole-array form is its reference.)

    Only the resize input mode gives datasets of different shapes (768×1024 and 1024×1024
    slices resize to 756×1022 and 1022×1022); padded labels are IGNORE_LABEL, so the loss
    never sees the padding.
    """
    height = max(a.shape[-2] for a in arrays)
    width = max(a.shape[-1] for a in arrays)
    padded = [
        np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, height - a.shape[-2]), (0, width - a.shape[-1])], constant_values=fill)
        if a.shape[-2:] != (height, width)
        else a
        for a in arrays
    ]
    return np.concatenate(padded)


def fingerprint_of(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_fingerprint(
    snapshot: dict[str, Any], tiles: dict[str, str], splits: dict[str, str], weights_identity: Any, code: str | None
) -> str:
    """What a checkpoint must share with this run to be resumed: its config, the tiles it
    trains on (view and content digest), the validation split's contents, the backbone's
    weights identity and the rule's code digest. Any difference starts the run afresh."""
    return fingerprint_of(
        {
            **snapshot,
            "tiles": {d: tiles_provenance(path) for d, path in sorted(tiles.items())},
            "splits": {d: read_json(path) for d, path in sorted(splits.items())},
            "weights_identity": weights_identity,
            "code": code,
        }
    )


def _then_decision_rules(fit: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Whatever the regime, training ends the same way: the written model is reloaded as
    evaluation will load it, and its decision rules are chosen on the run's validation slices."""

    @functools.wraps(fit)
    def run(**arguments: Any) -> dict[str, Any]:
        record = fit(**arguments)
        training, backbone, alignment = arguments["training"], arguments["backbone"], arguments.get("alignment", "none")
        if training:  # the regimes that train by gradient descent: the recipe they trained under
            record["recipe"] = recipe_of(training)
        model = load_segmenter(arguments["out_model"], backbone)
        feature_std = parse_alignment(alignment)["feature_std"]
        record["decision"] = choose_on_validation(
            model,
            arguments["regime"],
            arguments["datasets"],
            arguments["tiles"],
            arguments["features"],
            arguments["splits"],
            arguments["device"],
            feature_std,
        )
        write_json(arguments["out_run"], record)
        return record

    return run


@_then_decision_rules
def train_run(
    *,
    regime: str,
    backbone_name: str,
    train_set: str,
    datasets: list[str],
    seed: int,
    backbone: dict[str, Any],
    head: dict[str, Any],
    lora: dict[str, Any],
    training: dict[str, Any],
    tiles: dict[str, str],
    features: dict[str, str] | None,
    splits: dict[str, str],
    device: torch.device,
    out_model: Path,
    out_log: Path,
    out_run: Path,
    forest: dict[str, Any] | None = None,
    pixelforest: dict[str, Any] | None = None,
    alignment: str = "none",
    threads: int = 1,
    stop_after_epochs: int | None = None,
    code: str | None = None,
    n_train_slices: str = "all",
    data_in_memory: str = "auto",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one (backbone, regime, training set, seed) cell and write model, log and record.

    ``settings`` (scripting.job_settings: device, threads, data_in_memory, hub cache) go into
    the record as ``compute``: the ones that are no rerun trigger are kept there instead.

    ``n_train_slices``: 'all', or the number of labelled training slices per source dataset.
    ``data_in_memory``: compute.data_in_memory (load_training_data); the record's ``data_loading`` says what was done.

    ``code`` is the rule's code digest: a checkpoint written by other code is not resumed.

    Whatever the regime, training ends the same way: the written model is reloaded as
    evaluation will load it and its decision rules (threshold, post-processing size) are
    chosen on the run's validation slices (evaluation/evaluate.choose_on_validation), into
    run.json's ``decision``.
    """
    started = time.perf_counter()
    aligned = parse_alignment(alignment)
    balanced = bool(training.get("balanced_sampling", False) or aligned["balanced"]) and len(datasets) > 1
    snapshot = {
        "regime": regime,
        "backbone_name": backbone_name,
        "train_set": train_set,
        "datasets": datasets,
        "seed": seed,
        "backbone": backbone,
        "head": head,
        "lora": lora if regime == "lora" else None,
        "training": training,
        "balanced": balanced,
        "alignment": alignment,
        "n_train_slices": str(n_train_slices),
    }
    if regime == "pixelforest":
        # reads tiles (and tokens) tile by tile itself: per-pixel features of a split never fit in memory
        from em_foundation.training.pixelforest import train_pixelforest_run

        record = train_pixelforest_run(
            backbone_name=backbone_name,
            train_set=train_set,
            datasets=datasets,
            seed=seed,
            pixelforest=pixelforest or {},
            tiles=tiles,
            features=features,
            splits=splits,
            threads=threads,
            alignment=alignment,
            out_model=out_model,
            out_log=out_log,
            out_run=out_run,
            n_train_slices=str(n_train_slices),
        )
        return _record_settings(record, settings, out_run)
    generator = seed_everything(seed)
    train, val, data_record = load_training_data(
        regime, datasets, tiles, features, splits, aligned["feature_std"], str(n_train_slices), seed, data_in_memory
    )
    if regime == "forest":
        from em_foundation.training.forest import train_forest_run

        attrs = read_cache_attrs(features[datasets[0]])
        patch_size = int(attrs["patch_size"])
        record = train_forest_run(
            backbone_name=backbone_name,
            train_set=train_set,
            datasets=datasets,
            seed=seed,
            forest=forest or {},
            train=train,
            val=val,
            patch_size=patch_size,
            data_record=data_record,
            threads=threads,
            alignment=alignment,
            out_model=out_model,
            out_log=out_log,
            out_run=out_run,
            n_train_slices=str(n_train_slices),
            input_frame=int(attrs["input_frame"]) if "input_frame" in attrs else None,
        )
        return _record_settings(record, settings, out_run)
    in_channels = patch_size = input_standardisation = input_frame = None
    if regime == "head":
        cache = {d: read_cache_attrs(features[d]) for d in datasets}
        in_channels = int(train.inputs.shape[1])
        patch_size = int(cache[datasets[0]]["patch_size"])
        input_frame = int(cache[datasets[0]]["input_frame"]) if "input_frame" in cache[datasets[0]] else None
        snapshot["weights_identity"] = {d: str(attrs["weights_identity"]) for d, attrs in cache.items()}
        if any(str(attrs.get("family")) in STANDARDISED_FAMILIES for attrs in cache.values()):
            # eps far below the smallest filter-bank variance (~1e-11), so every channel reaches unit variance.
            stats = domain_stats(train.inputs, eps=1e-14, dataset=train_set, split="train")
            input_standardisation = {"mean": stats.mean.tolist(), "scale": stats.scale.tolist()}
    model = build_segmenter(regime, backbone, head, lora, in_channels, patch_size, input_standardisation, input_frame)
    checkpoint = out_model.with_name("checkpoint.pt")
    # a whole segmenter (the U-Net) carries its weights' identity itself
    weights_identity = snapshot.get("weights_identity") or getattr(getattr(model, "backbone", model), "identity", None)
    fingerprint = resume_fingerprint(snapshot, tiles, splits, weights_identity, code)
    try:
        result = fit(
            model, train, val, training, generator, device, checkpoint, fingerprint, balanced, stop_after_epochs
        )
    except NonFiniteLoss as error:
        # Nothing of a diverged run is worth resuming from; a rerun with a new lr starts afresh.
        checkpoint.unlink(missing_ok=True)
        run = Run(backbone_name, regime, train_set, seed, alignment, str(n_train_slices)).path
        raise TrainingDiverged(
            f"run {run}: training diverged at epoch {error.epoch}: the {error.which} loss is {error.value}. "
            f"No model was written. Lower training.lr (now {training['lr']}) or training.grad_clip "
            f"(now {training['grad_clip']}) and rerun."
        ) from None
    with atomic_path(out_model, suffix=".pt") as tmp:
        torch.save(
            {
                "regime": regime,
                "in_channels": in_channels,
                "patch_size": patch_size,
                "input_standardisation": input_standardisation,
                "input_frame": input_frame,
                "state": result.best_state,
                "config": snapshot,
            },
            tmp,
        )
    write_csv(result.history, out_log)
    record = {
        **{
            k: snapshot[k]
            for k in (
                "regime",
                "backbone_name",
                "train_set",
                "datasets",
                "seed",
                "balanced",
                "alignment",
                "n_train_slices",
            )
        },
        "n_labelled_slices": sum(len(part["labelled_slices"]) for part in data_record.values()),
        # validation slices are labelled slices too: the label-efficiency figure counts both
        "n_validation_slices": sum(len(part["val_slices"]) for part in data_record.values()),
        "augment": augmentation_of(training),
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "epochs_run": int(len(result.history)),
        "steps_run": result.steps_run,
        "best_step": result.best_step,
        "stop_reason": result.stop_reason,
        "resumed_from_epoch": result.resumed_from_epoch,
        "tiles_drawn_per_source": result.sampled_per_source,
        "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "weights_manifest": manifest_citation(weights_identity),
        "data": data_record,
        "data_loading": train.loading,
        "seconds": time.perf_counter() - started,
        **({"compute": settings} if settings else {}),
    }
    write_json(out_run, record)
    checkpoint.unlink(missing_ok=True)
    return record


def _record_settings(record: dict[str, Any], settings: dict[str, Any] | None, out_run: Path) -> dict[str, Any]:
    """Add the job's compute settings to a forest's run record (written by the forest's own module)."""
    if settings:
        record = {**record, "compute": settings}
        write_json(out_run, record)
    return record


def load_segmenter(model_path: Path, backbone: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a trained segmenter from its checkpoint (frozen weights come from the backbone)."""
    saved = torch.load(model_path, map_location="cpu", weights_only=False)
    if saved["regime"] == "forest":
        from em_foundation.training.forest import ForestSegmenter

        return ForestSegmenter(saved["forest"], saved.get("input_frame")).eval()
    if saved["regime"] == "pixelforest":
        from em_foundation.training.pixelforest import load_pixel_forest

        return load_pixel_forest(saved)
    config = saved["config"]
    model = build_segmenter(
        saved["regime"],
        backbone,
        config["head"],
        config["lora"] or {},
        saved["in_channels"],
        saved["patch_size"],
        saved.get("input_standardisation"),
        saved.get("input_frame"),
    )
    result = model.load_state_dict(saved["state"], strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{model_path}: keys the model lacks: {result.unexpected_keys[:5]}")
    expected = set(trainable_state_dict(model))
    missing = expected - set(saved["state"])
    if missing:
        raise RuntimeError(f"{model_path}: trained keys missing from the checkpoint: {sorted(missing)[:5]}")
    return model.eval()
