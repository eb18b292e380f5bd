"""The published input mode: whole slices resized for the backbone, scored at native resolution."""

from pathlib import Path

import numpy as np
import torch

from em_foundation.backbones import build_backbone
from em_foundation.data.convert import prepare_dataset
from em_foundation.data.prepared import read_split
from em_foundation.data.splits import validation_split
from em_foundation.data.tiles import read_tiles, resized_shape, tile_dataset
from em_foundation.evaluation.evaluate import evaluate_model
from em_foundation.feature_cache import cache_features, read_tokens
from em_foundation.grid import parse_view, view_of
from em_foundation.io import write_json
from em_foundation.training.run import load_segmenter, train_run
from tests.helpers import HEAD, TINY_VIT, TRAINING


def test_published_resize_shapes():
    assert resized_shape(768, 1024, 1022, 14) == (756, 1022)
    assert resized_shape(768, 1024, 1022, 16) == (752, 1008)
    assert resized_shape(1024, 1024, 1022, 16) == (1008, 1008)


def test_view_names_follow_the_config():
    config = {
        "tiling": {"mode": "resize", "tile_size": 448, "overlap": 64, "longest_edge": 1022},
        "backbones": {
            "a": {"family": "dinov2", "model": "vit_large_patch14_dinov2"},
            "b": {"family": "dinov3", "model": "vit_large_patch16_dinov3"},
        },
    }
    assert view_of(config, "a") == "resize1022p14" and view_of(config, "b") == "resize1008p16"
    assert parse_view("resize1022p16") == {"mode": "resize", "longest_edge": 1022, "patch_size": 16, "intensity": "raw"}
    assert parse_view("tile448o64-histmatch")["intensity"] == "histmatch"
    config["tiling"]["mode"] = "tile"
    assert view_of(config, "a") == view_of(config, "b") == "tile448o64"


def make(root: Path, name: str, domain: str, height: int, width: int, seed: int) -> dict:
    spec = {
        "converter": "synthetic",
        "url": None,
        "sha256": None,
        "foreground_fraction": [0.0, 1.0],
        "options": {"domain": domain, "n_train": 4, "n_test": 2, "height": height, "width": width, "seed": seed},
    }
    paths = {k: str(root / f"{name}.{k}.h5") for k in ("prepared", "tiles", "features")}
    prepare_dataset(name, spec, None, Path(paths["prepared"]), root / f"{name}.json")
    tile_dataset(paths["prepared"], paths["tiles"], view=parse_view("resize126p14"))
    write_json(root / f"{name}.split.json", validation_split(read_split(paths["prepared"], "train").names, 0.25, 0))
    cache_features(build_backbone(TINY_VIT), paths["tiles"], paths["features"], 2, torch.device("cpu"), {})
    return paths


def test_resize_mode_trains_on_mixed_shapes_and_scores_at_native_resolution(tmp_path):
    data = {
        "wide": make(tmp_path, "wide", "fibsem", 96, 128, 1),
        "square": make(tmp_path, "square", "sstem", 128, 128, 2),
    }
    wide = read_tiles(data["wide"]["tiles"], "train")
    assert wide.mode == "resize" and wide.tile_shape == (84, 126) and len(wide.raw) == 4
    assert read_tokens(data["wide"]["features"], "train").shape[-2:] == (6, 9)
    record = train_run(
        regime="head",
        backbone_name="tinyvit",
        train_set="paired",
        datasets=["wide", "square"],
        seed=0,
        backbone={},
        head=HEAD,
        lora={},
        training=TRAINING,
        tiles={d: p["tiles"] for d, p in data.items()},
        features={d: p["features"] for d, p in data.items()},
        splits={d: str(tmp_path / f"{d}.split.json") for d in data},
        device=torch.device("cpu"),
        out_model=tmp_path / "m.pt",
        out_log=tmp_path / "l.csv",
        out_run=tmp_path / "r.json",
    )
    assert record["epochs_run"] >= 1
    model = load_segmenter(tmp_path / "m.pt", {})
    per_image, predictions = evaluate_model(
        model, "head", data["wide"]["prepared"], data["wide"]["tiles"], data["wide"]["features"], torch.device("cpu")
    )
    assert all(p.shape == (96, 128) for p in predictions)
    assert (per_image["height"] == 96).all() and (per_image["width"] == 128).all()
    assert set(np.unique(predictions[0])) <= {0, 1}
