"""The experiment grid: which runs and evaluations a config asks for.

Kept free of torch so that the Snakefile can enumerate the whole published grid in a
dry-run within seconds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Views of the families and regimes tables, importable from here as before.
from em_foundation.families import (  # noqa: F401
    FAMILIES,
    FAMILY_DEFAULT_PATCH,
    FAMILY_OPTIONS,
    FAMILY_REGIMES,
    HUB_FAMILIES,
    family_of,
)
from em_foundation.regimes import BACKBONE_REGIMES, CACHED_REGIMES, PIXEL_REGIMES, REGIMES  # noqa: F401


def patch_size_of(backbone: dict[str, Any]) -> int:
    """Patch size of a backbone config entry, read from its model name or overrides."""
    family = family_of(backbone["family"])
    if family.name == "filterbank":
        return int(backbone.get("options", {}).get("patch_size", family.default_patch))
    override = backbone.get("model_kwargs", {}).get("patch_size")
    if override:
        return int(override)
    match = re.search(r"patch(\d+)|-(\d+)(?:-|$)", backbone.get("model") or "")
    if match:
        return int(match.group(1) or match.group(2))
    return family.default_patch


INTENSITY_ALIGNMENTS = ("percentile", "histmatch")
TRANSDUCTIVE = "trans"
# Resamples every dataset to one pixel size (alignment.pixel_size_nm) before tiling.
RESCALE = "rescale"
ALIGNMENT_COMPONENTS = ("featstd", "percentile", "histmatch", "adabn", "balanced", RESCALE, TRANSDUCTIVE)
# Components that take statistics from the images being scored (or, by default, from the
# target dataset's unlabelled training split instead).
STATISTICS_COMPONENTS = ("featstd", "adabn", *INTENSITY_ALIGNMENTS)


def parse_alignment(name: str) -> dict[str, Any]:
    """'none' or components joined by '-', e.g. 'featstd-balanced' or 'histmatch-adabn'.

    featstd: per-domain standardisation of cached patch tokens (cached regimes only);
    percentile / histmatch: per-domain intensity normalisation of the raw slices;
    adabn: the head's batch-norm statistics re-estimated on a target domain's unlabelled images;
    balanced: every batch draws equally from each source dataset;
    rescale: every dataset resampled to ``alignment.pixel_size_nm`` before tiling (tile mode),
    so that a VFM sees organelles of every domain at the same size in pixels.

    Inductive by default: featstd, adabn and the intensity normalisations take a dataset's
    statistics from its unlabelled *training* split, never from the test images being
    scored. The component ``trans`` (e.g. 'featstd-trans') makes them transductive: the
    statistics of the test images themselves (their labels are never used); runs.csv and
    summary.csv mark such runs in their ``transductive`` column.
    """
    parts = [] if name == "none" else name.split("-")
    unknown = [part for part in parts if part not in ALIGNMENT_COMPONENTS]
    intensity = [part for part in parts if part in INTENSITY_ALIGNMENTS]
    if unknown or len(intensity) > 1 or len(set(parts)) != len(parts) or not name:
        raise ValueError(
            f"alignment {name!r} is not 'none' or a '-'-joined set of {', '.join(ALIGNMENT_COMPONENTS)} "
            "with at most one intensity normalisation"
        )
    transductive = TRANSDUCTIVE in parts
    if transductive and not set(parts) & set(STATISTICS_COMPONENTS):
        raise ValueError(
            f"alignment {name!r}: '{TRANSDUCTIVE}' (statistics from the test images) needs a component that takes "
            f"statistics: {', '.join(STATISTICS_COMPONENTS)}"
        )
    kind = intensity[0] if intensity else "raw"
    return {
        # The tile view's intensity suffix: transductive normalisation is a different input.
        "intensity": f"{kind}-{TRANSDUCTIVE}" if transductive and kind != "raw" else kind,
        "feature_std": "featstd" in parts,
        "adabn": "adabn" in parts,
        "balanced": "balanced" in parts,
        "rescale": RESCALE in parts,
        "transductive": transductive,
    }


def input_variant(config: dict[str, Any], alignment: str) -> str:
    """How an alignment changes what a backbone reads: 'raw', an intensity normalisation
    ('percentile', 'histmatch-trans'), a common pixel size ('nm5') or both ('nm5-percentile').

    The variant names the tiles' view suffix (``view_of``) and the features' folder, so an
    aligned input lives beside the unaligned one and is computed once for every run using it.
    """
    parsed = parse_alignment(alignment)
    parts = [f"nm{float(config['alignment']['pixel_size_nm']):g}"] if parsed["rescale"] else []
    if parsed["intensity"] != "raw":
        parts.append(parsed["intensity"])
    return "-".join(parts) or "raw"


def split_variant(variant: str) -> tuple[float | None, str]:
    """'nm5-percentile' -> (5.0, 'percentile'); 'raw' -> (None, 'raw')."""
    match = re.fullmatch(r"(?:nm(\d+(?:\.\d+)?))?-?(.*)", variant)
    if match is None:
        raise ValueError(f"unknown input variant {variant!r}")
    return (float(match.group(1)) if match.group(1) else None), (match.group(2) or "raw")


INTENSITY_VIEWS = ("raw", *INTENSITY_ALIGNMENTS, *(f"{kind}-{TRANSDUCTIVE}" for kind in INTENSITY_ALIGNMENTS))


def resized_edge(longest_edge: int, patch: int) -> int:
    """The longest edge a backbone really gets: the configured one floored to its patch.

    The published 1022 gives 1022 for patch 14 and 1008 for patch 16: the slice is
    resized so that its longest edge is that many pixels, then each side is floored to
    the patch (data/tiles.resized_shape).
    """
    return max(patch, longest_edge // patch * patch)


# SAM's encoders take 1024-pixel inputs (their 64x64 positional grid at patch 16).
SAM_IMAGE_SIZE = 1024


def sam_input_size(backbone: dict[str, Any]) -> int | None:
    """The square a backbone resizes and pads every input into (``options.input: sam``), or None:
    the encoder's own input size (timm's img_size, 1024 unless a test's toy model says otherwise)."""
    if (backbone.get("options") or {}).get("input", "native") != "sam":
        return None
    return int((backbone.get("model_kwargs") or {}).get("img_size", SAM_IMAGE_SIZE))


def view_of(config: dict[str, Any], backbone: str, variant: str = "raw") -> str:
    """How a backbone sees a dataset: the tile geometry (and intensity normalisation) of its inputs.

    Tiling is shared by every backbone; the published resize mode depends on the patch
    size (1022 for patch 14, 1008 for patch 16), so it gets one view per patch size.
    ``variant`` is an alignment's ``input_variant`` (a pixel size and/or an intensity normalisation).
    """
    tiling = config["tiling"]
    pixel_size, intensity = split_variant(variant)
    pixel_size = pixel_size or tiling.get("pixel_size_nm")
    if tiling["mode"] == "tile":
        geometry = f"tile{tiling['tile_size']}o{tiling['overlap']}"
        if pixel_size:  # resampled to a common pixel size: tiles live beside the native ones
            geometry += f"nm{float(pixel_size):g}"
    else:
        spec = config["backbones"][backbone]
        patch = patch_size_of(spec)
        # SAM's own input: slices resized to its input size (not 1022) before it pads them
        longest = sam_input_size(spec) or tiling["longest_edge"]
        geometry = f"resize{resized_edge(longest, patch)}p{patch}"
    return geometry if intensity == "raw" else f"{geometry}-{intensity}"


def parse_view(view: str) -> dict[str, Any]:
    geometry, _, intensity = view.partition("-")
    intensity = intensity or "raw"
    if intensity not in INTENSITY_VIEWS:
        raise ValueError(f"unknown intensity normalisation {intensity!r} in tile view {view!r}")
    tile = re.fullmatch(r"tile(\d+)o(\d+)(?:nm(\d+(?:\.\d+)?))?", geometry)
    if tile:
        return {
            "mode": "tile",
            "tile_size": int(tile.group(1)),
            "overlap": int(tile.group(2)),
            "intensity": intensity,
            # None: the dataset's native pixel size; else every dataset is resampled to this many nm per pixel
            "pixel_size_nm": float(tile.group(3)) if tile.group(3) else None,
        }
    resize = re.fullmatch(r"resize(\d+)p(\d+)", geometry)
    if resize:
        return {
            "mode": "resize",
            "longest_edge": int(resize.group(1)),
            "patch_size": int(resize.group(2)),
            "intensity": intensity,
        }
    raise ValueError(f"unknown tile view {view!r}")


# Where everything of one trained model lives, below results/models, results/evaluation, ...
# ``labels`` is empty for a model trained on every training slice (today's paths unchanged) and
# ``-n<k>`` for one trained on k labelled slices per source (training.n_train_slices): seed0-n2.
RUN_PATTERN = "{backbone}/{regime}/{train_set}/{alignment}/seed{seed}{labels}"
ALL_SLICES = "all"
# training keys that make the label-efficiency sweep: in the run path, not passed to training
SWEEP_KEYS = ("n_train_slices", "n_train_slices_for")


def labels_suffix(n_train_slices: int | str) -> str:
    return "" if str(n_train_slices) == ALL_SLICES else f"-n{int(n_train_slices)}"


def n_train_slices_of(labels: str) -> str:
    """The ``labels`` wildcard back to the n_train_slices value: '' -> 'all', '-n2' -> '2'."""
    if not labels:
        return ALL_SLICES
    match = re.fullmatch(r"-n(\d+)", labels)
    if not match:
        raise ValueError(f"labels suffix {labels!r} is not '' or '-n<k>'")
    return match.group(1)


@dataclass(frozen=True)
class Run:
    """One trained model: a cell of the grid and one of its seeds (and its number of labelled slices)."""

    backbone: str
    regime: str
    train_set: str
    seed: int
    alignment: str = "none"
    n_train_slices: str = ALL_SLICES

    @property
    def path(self) -> str:
        fields = asdict(self)
        return RUN_PATTERN.format(**fields, labels=labels_suffix(fields.pop("n_train_slices")))


def n_train_slices_for(config: dict[str, Any], train_set: str) -> list[str]:
    """The label-efficiency sweep of one training set: training.n_train_slices where
    training.n_train_slices_for is null or names it, else every slice only ('all')."""
    training = config["training"]
    sizes = training.get("n_train_slices") or [ALL_SLICES]
    chosen = training.get("n_train_slices_for")
    if chosen is not None and train_set not in chosen and re.sub(rf"{FOLD}\d+$", "", train_set) not in chosen:
        return [ALL_SLICES]
    return [str(size) for size in sizes]


def feature_backbones(config: dict[str, Any]) -> list[str]:
    """Backbones with a patch-token grid: every one but whole segmenters (the U-Net), which the
    domain analysis (features of every dataset) cannot read."""
    return [name for name, spec in config["backbones"].items() if not FAMILIES[spec["family"]].segmenter]


def regimes_for(config: dict[str, Any], backbone: str) -> list[str]:
    family = config["backbones"][backbone]["family"]
    return [r for r in config["regimes"] if r in FAMILIES[family].regimes]


def alignments_for(config: dict[str, Any], regime: str, train_set: str) -> list[str]:
    """Alignment variants of one cell: 'none' always; the others where configured and meaningful."""
    block = config["alignment"]
    chosen = ["none"]
    for name in block["variants"]:
        if name == "none" or (block["train_sets"] is not None and train_set not in block["train_sets"]):
            continue
        options = parse_alignment(name)
        if regime in PIXEL_REGIMES and (options["feature_std"] or options["adabn"] or options["balanced"]):
            continue  # a per-pixel forest: no batch norm, no batches; only intensity normalisation applies
        if options["feature_std"] and regime not in CACHED_REGIMES:
            continue  # the tokens of a backbone that trains change every step
        if options["adabn"] and "head" not in REGIMES[regime].trains:
            continue  # a forest has no batch-norm statistics
        if options["balanced"] and len(config["training_sets"][train_set]) < 2:
            continue  # one source: balanced sampling would repeat another variant exactly
        chosen.append(name)
    return chosen


def runs(config: dict[str, Any]) -> list[Run]:
    return [
        Run(backbone, regime, train_set, seed, alignment, size)
        for backbone in config["backbones"]
        for regime in regimes_for(config, backbone)
        for train_set in config["training_sets"]
        for alignment in alignments_for(config, regime, train_set)
        for size in n_train_slices_for(config, train_set)
        for seed in config["seeds"]
    ]


def test_sets(config: dict[str, Any]) -> list[str]:
    return list(config["evaluation"]["test_sets"] or config["datasets"])


# k-fold test splits as a run dimension: a dataset whose options say ``split: kfold`` (and
# no ``fold``) becomes one dataset per fold, ``<name>fold<k>`` with ``options.fold: k``, and
# every training set that contains it one training set per fold. Every later stage then
# treats a fold as a dataset of its own; the tables name the fold in a ``fold`` column,
# fold the names back, and drop the scores of a fold's model on another fold's test
# sections (which it trained on).
FOLD = "fold"


def expand_folds(config: dict[str, Any]) -> dict[str, Any]:
    """Replace k-fold datasets (and the training sets holding them) by one per fold, in place."""
    datasets, n_folds = {}, {}
    for name, spec in config["datasets"].items():
        options = spec.get("options") or {}
        if options.get("split") == "kfold" and "fold" not in options:
            n_folds[name] = int(options.get("n_folds", 5))
            for k in range(n_folds[name]):
                datasets[f"{name}{FOLD}{k}"] = {**spec, "options": {**options, "fold": k}}
        else:
            datasets[name] = spec
    if not n_folds:
        return config
    training_sets = {}
    for name, members in config["training_sets"].items():
        split = {n_folds[m] for m in members if m in n_folds}
        if not split:
            training_sets[name] = members
            continue
        if len(split) > 1:
            raise ValueError(f"training_sets.{name} unites k-fold datasets with different n_folds: {sorted(split)}")
        for k in range(split.pop()):
            training_sets[f"{name}{FOLD}{k}"] = [f"{m}{FOLD}{k}" if m in n_folds else m for m in members]

    def per_fold(names):
        return (
            None
            if names is None
            else [f"{n}{FOLD}{k}" for n in names if n in n_folds for k in range(n_folds[n])]
            + [n for n in names if n not in n_folds]
        )

    config["datasets"], config["training_sets"] = datasets, training_sets
    config["evaluation"]["test_sets"] = per_fold(config["evaluation"].get("test_sets"))
    alignment = config.get("alignment") or {}
    if alignment.get("train_sets") is not None:
        alignment["train_sets"] = [
            t
            for t in training_sets
            if t in alignment["train_sets"] or re.sub(rf"{FOLD}\d+$", "", t) in alignment["train_sets"]
        ]
    if alignment.get("reference") in n_folds:
        alignment["reference"] = f"{alignment['reference']}{FOLD}0"
    return config


def fold_names(config: dict[str, Any]) -> dict[str, list]:
    """{dataset or training set of one fold: [its name without the fold, the fold]}."""
    folds: dict[str, list] = {}
    for name, spec in config["datasets"].items():
        options = spec.get("options") or {}
        if options.get("split") == "kfold" and name.endswith(f"{FOLD}{options.get('fold')}"):
            folds[name] = [name.removesuffix(f"{FOLD}{options['fold']}"), int(options["fold"])]
    for name, members in config["training_sets"].items():
        ks = {folds[m][1] for m in members if m in folds}
        if len(ks) == 1 and name.endswith(f"{FOLD}{next(iter(ks))}"):
            folds[name] = [name.removesuffix(f"{FOLD}{next(iter(ks))}"), ks.pop()]
    return folds


def predict_run(config: dict[str, Any]) -> dict[str, Any]:
    """The model the ``predict`` target applies: the config's ``predict`` block with its defaults filled in.

    Defaults are the first backbone, the first regime that backbone runs, the first training
    set and the first seed, so that ``predict={images: ...}`` alone names a trained model.
    """
    block = config.get("predict") or {}
    images = block.get("images")
    problems = []
    backbone = block.get("backbone") or next(iter(config["backbones"]))
    if backbone not in config["backbones"]:
        problems.append(f"predict.backbone {backbone!r} is not under backbones ({', '.join(config['backbones'])})")
        backbone = next(iter(config["backbones"]))
    family = config["backbones"][backbone]["family"]
    runnable = [r for r in config["regimes"] if r in FAMILY_REGIMES[family]]
    regime = block.get("regime") or (runnable[0] if runnable else config["regimes"][0])
    if regime not in runnable:
        problems.append(f"predict.regime {regime!r}: backbone {backbone!r} runs {', '.join(runnable) or 'nothing'}")
    train_set = block.get("train_set") or next(iter(config["training_sets"]))
    if train_set not in config["training_sets"]:
        problems.append(f"predict.train_set {train_set!r} is not under training_sets")
        train_set = next(iter(config["training_sets"]))
    seed = block.get("seed")
    seed = config["seeds"][0] if seed is None else int(seed)
    if block.get("model") is None and seed not in config["seeds"]:
        problems.append(f"predict.seed {seed} is not under seeds {config['seeds']} (or give predict.model)")
    alignment = block.get("alignment") or "none"
    try:
        parse_alignment(alignment)
    except ValueError as error:
        problems.append(f"predict.alignment: {error}")
        alignment = "none"
    trained = alignments_for(config, regime, train_set) if regime in runnable else ["none"]
    if block.get("model") is None and alignment not in trained:
        problems.append(
            f"predict.alignment {alignment!r}: the workflow trains {regime}/{train_set} with {', '.join(trained)} "
            "(alignment.variants, alignment.train_sets), or give predict.model"
        )
    # Without images the target is not in use: the defaults only name its (unused) output.
    if problems and images:
        raise ValueError("; ".join(problems))
    name = block.get("name") or (Path(str(images).split(":")[0]).stem if images else "unset")
    return {
        "backbone": backbone,
        "regime": regime,
        "train_set": train_set,
        "alignment": alignment,
        "seed": seed,
        "model": block.get("model"),
        "images": images,
        "name": name,
    }
