"""One backbone's domain analysis: read its feature caches, analyse every view, gather tables.

Two views of every dataset (train and test splits together):
  pooled  one embedding per image, the cache's /<split>/pooled (the study's view);
  tokens  patch tokens sampled per tile from /<split>/tokens, grouped by source image so
          that bootstrap, folds and permutations move whole images (what the heads see).
Tiles are read a chunk at a time, so a published-size cache never sits in memory whole.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from em_foundation.analysis.domain import analyse_domains, sample_patch_tokens
from em_foundation.feature_cache import CheckedTokens
from em_foundation.io import check_finite, open_h5
from em_foundation.report_pages import FRECHET_COLUMNS, PROBE_COLUMNS

CHUNK = 64  # tiles read at once
UMAP_COLUMNS = ["backbone", "view", "dataset", "index", "umap1", "umap2"]


def pooled_view(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_images, C) over both splits, with 'split/image' ids."""
    with open_h5(path) as handle:
        splits = sorted(handle)
        arrays = [check_finite(handle[s]["pooled"][()], path, f"/{s}/pooled") for s in splits]
    ids = [f"{s}/{i}" for s, a in zip(splits, arrays) for i in range(len(a))]
    return np.concatenate(arrays).astype(np.float32), np.array(ids)


def token_view(features: str, tiles: str, per_tile: int, max_tokens: int | None, seed: int, stream: int):
    """(n_tiles * take, C) sampled tokens over both splits, with their source-image ids.

    ``take`` is ``per_tile``, capped at the grid size and, when ``max_tokens`` is set, at
    max_tokens // n_tiles (at least 1): every tile, so every image, still contributes.
    """
    chunks, ids = [], []
    with open_h5(tiles) as tile_file:  # tile -> image, the tiles file's layout
        image_indices = {split: tile_file[split]["image_index"][()] for split in tile_file}
    with open_h5(features) as handle:
        splits = sorted(handle)
        total_tiles = sum(len(handle[s]["tokens"]) for s in splits)
        _, _, h, w = handle[splits[0]]["tokens"].shape
        take = min(per_tile, h * w)
        if max_tokens:
            take = max(1, min(take, max_tokens // total_tiles))
        for k, split in enumerate(splits):
            tokens = CheckedTokens(handle, split, features)
            image_index = image_indices[split]
            if len(image_index) != len(tokens):
                raise ValueError(f"{features}: {len(tokens)} {split} tiles but {tiles} has {len(image_index)}")
            n_tiles = len(tokens)
            for start in range(0, n_tiles, CHUNK):
                state = np.random.SeedSequence([seed, stream, k, start]).generate_state(1)[0]
                sample, tile = sample_patch_tokens(
                    tokens[start : start + CHUNK], take, seed=int(state), return_index=True
                )
                chunks.append(sample.astype(np.float32))
                ids.append(np.char.add(f"{split}/", image_index[start + tile].astype(str)))
    return np.concatenate(chunks), np.concatenate(ids), take, h * w


def standardised_per_dataset(embeddings: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each dataset's (n, C) vectors to zero mean and unit variance per channel on its own.

    The alignment variant featstd's standardisation (alignment.features), on vectors seen as
    (n, C, 1, 1) token grids, so the analysis and the heads standardise the same way.
    """
    from em_foundation.alignment.features import domain_stats, standardise

    out = {}
    for dataset, x in embeddings.items():
        grid = x[:, :, None, None]
        out[dataset] = standardise(grid, domain_stats(grid, dataset=dataset))[:, :, 0, 0]
    return out


def cache_attrs(path: str) -> dict[str, Any]:
    with open_h5(path) as handle:
        return {k: (v.item() if isinstance(v, np.generic) else str(v)) for k, v in handle.attrs.items()}


def analyse_backbone(
    backbone: str, features: dict[str, str], tiles: dict[str, str], opts: dict[str, Any], after_featstd: bool = False
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Every table of one backbone's domain analysis and the summary record (JSON-ready once ``plain``)."""
    started = time.time()
    datasets = list(features)
    notes, views, tables = [], {}, {}
    if "pooled" in opts["views"]:
        loaded = {d: pooled_view(features[d]) for d in datasets}
        views["pooled"] = ({d: x for d, (x, _) in loaded.items()}, None)
    if "tokens" in opts["views"]:
        loaded = {
            d: token_view(
                features[d], tiles[d], opts["tokens_per_tile"], opts["max_tokens_per_dataset"], opts["seed"], i
            )
            for i, d in enumerate(datasets)
        }
        views["tokens"] = ({d: v[0] for d, v in loaded.items()}, {d: v[1] for d, v in loaded.items()})
        for d, (_, _, take, grid) in loaded.items():
            if take < opts["tokens_per_tile"]:
                notes.append(
                    f"tokens: sampled {take} per tile from {d}, not {opts['tokens_per_tile']} "
                    f"(grid of {grid} positions; max_tokens_per_dataset {opts['max_tokens_per_dataset']})"
                )
    if after_featstd:
        # The same analysis after per-domain feature standardisation (alignment variant featstd).
        for view, (embeddings, groups) in list(views.items()):
            views[f"{view}-featstd"] = (standardised_per_dataset(embeddings), groups)

    for view, (embeddings, groups) in views.items():
        print(f"{view}: " + ", ".join(f"{d} {x.shape}" for d, x in embeddings.items()), flush=True)
        t0 = time.time()
        result = analyse_domains(
            embeddings,
            seed=opts["seed"],
            n_boot=opts["n_boot"],
            pca_dim=opts["pca_dim"],
            groups=groups,
            n_perm=opts["n_perm"],
            probe_permutations=opts["probe_permutations"],
            percentile=opts["percentile"],
            n_splits=opts["n_splits"],
            balance_pca=opts["balance_pca"],
            umap=opts["umap"],
        )
        print(f"{view}: analysed in {time.time() - t0:.1f} s", flush=True)
        notes += [f"{view}: {note}" for note in result.pop("notes")]
        for name, frame in result.items():
            frame.insert(0, "view", view)
            frame.insert(0, "backbone", backbone)
            tables.setdefault(name, []).append(frame)

    tables = {name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()}
    pca = tables["pca"]
    umap = pca[UMAP_COLUMNS] if {"umap1", "umap2"} <= set(pca) else pd.DataFrame(columns=UMAP_COLUMNS)
    if not opts["umap"]:
        notes.append("UMAP not asked for (analysis.umap: false)")
    tables["pca"] = pca.drop(columns=["umap1", "umap2"], errors="ignore")
    tables["umap"] = umap
    summary = {
        "backbone": backbone,
        "datasets": datasets,
        "features": {d: cache_attrs(features[d]) for d in datasets},
        "analysis": opts,
        "views": list(views),
        "counts": tables["counts"].to_dict(orient="records"),
        "frechet": tables["frechet"][FRECHET_COLUMNS].to_dict(orient="records"),
        "probe": tables["probe"][PROBE_COLUMNS].to_dict(orient="records"),
        "umap": "written" if len(umap) else "skipped",
        "notes": notes,
        "seconds": round(time.time() - started, 1),
    }
    return tables, summary


def plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
