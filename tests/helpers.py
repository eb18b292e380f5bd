"""Small real pipelines for tests: synthetic data through the package's own stages."""

from __future__ import annotations

from pathlib import Path

import torch

from em_foundation.backbones import build_backbone
from em_foundation.data.convert import prepare_dataset
from em_foundation.data.prepared import read_split
from em_foundation.data.splits import validation_split
from em_foundation.data.tiles import tile_dataset
from em_foundation.feature_cache import cache_features
from em_foundation.grid import parse_view
from em_foundation.io import write_json

FILTERBANK = {"family": "filterbank", "options": {"patch_size": 8}}
TINY_VIT = {
    "family": "dinov2",
    "model": "vit_small_patch14_dinov2",
    "weights": "random",
    "revision": None,
    "normalisation": "family",
    "layers": [-1],
    "pooling": "mean",
    "options": {},
    "model_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 112},
}
HEAD = {"width": 16}
LORA = {"rank": 2, "alpha": 4, "dropout": 0.0}
TRAINING = {
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "batch_size": 4,
    "max_epochs": 4,
    "patience": 3,
    "grad_clip": 1.0,
    "val_fraction": 0.2,
}


def make_dataset(
    root: Path,
    name: str,
    domain: str,
    n_train: int = 4,
    n_test: int = 2,
    size: int = 128,
    seed: int = 0,
    backbone: dict | None = None,
) -> dict[str, str]:
    """Prepared file, tiles, a validation split per seed 0..4, and a feature cache."""
    spec = {
        "converter": "synthetic",
        "url": None,
        "sha256": None,
        "foreground_fraction": [0.0, 1.0],
        "options": {
            "domain": domain,
            "n_train": n_train,
            "n_test": n_test,
            "height": size,
            "width": size,
            "seed": seed,
        },
    }
    paths = {
        "prepared": str(root / f"{name}.h5"),
        "tiles": str(root / f"{name}.tiles.h5"),
        "features": str(root / f"{name}.features.h5"),
    }
    prepare_dataset(name, spec, None, Path(paths["prepared"]), root / f"{name}.integrity.json")
    tile_dataset(paths["prepared"], paths["tiles"], view=parse_view("tile112o16"))
    names = read_split(paths["prepared"], "train").names
    for seed_ in range(5):
        write_json(root / f"{name}.split{seed_}.json", validation_split(names, 0.25, seed_))
    backbone_ = build_backbone(backbone or FILTERBANK)
    cache_features(backbone_, paths["tiles"], paths["features"], 4, torch.device("cpu"), {"backbone": "test"})
    return paths
