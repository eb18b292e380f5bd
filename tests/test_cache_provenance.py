"""Provenance: a feature cache is only used with the tiles it was computed from; a
checkpoint is only resumed by the run that wrote it (tiles, split, weights, code)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from em_foundation.data.tiles import tile_dataset, tiles_provenance
from em_foundation.evaluation.evaluate import evaluate_model
from em_foundation.feature_cache import StaleCacheError, read_cache_attrs
from em_foundation.grid import parse_view
from em_foundation.training.run import load_segmenter, resume_fingerprint, train_run
from tests.helpers import HEAD, TRAINING, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    paths = make_dataset(root, "fibsem", "fibsem", seed=1)
    # The same slices cut another way: another view, another content digest.
    other = root / "tile112o32" / "fibsem.h5"
    tile_dataset(paths["prepared"], other, view=parse_view("tile112o32"), view_name="tile112o32")
    return {**paths, "root": root, "other_tiles": str(other)}


def run(data, out, tiles=None, seed=0, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    return train_run(
        regime="head",
        backbone_name="filterbank",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=seed,
        backbone={},
        head=HEAD,
        lora={},
        training=kwargs.pop("training", TRAINING),
        tiles={"fibsem": tiles or data["tiles"]},
        features={"fibsem": data["features"]},
        splits={"fibsem": kwargs.pop("split", str(data["root"] / f"fibsem.split{seed}.json"))},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "log.csv",
        out_run=out / "run.json",
        **kwargs,
    )


def test_cache_records_its_tiles(data):
    attrs = read_cache_attrs(data["features"])
    assert attrs["tiles_digest"] == tiles_provenance(data["tiles"])["tiles_digest"]
    assert tiles_provenance(data["other_tiles"]) == {
        "tile_view": "tile112o32",
        "tiles_digest": tiles_provenance(data["other_tiles"])["tiles_digest"],
    }
    assert tiles_provenance(data["other_tiles"])["tiles_digest"] != attrs["tiles_digest"]


def test_training_and_evaluation_refuse_a_cache_of_other_tiles(data, tmp_path):
    with pytest.raises(StaleCacheError) as error:
        run(data, tmp_path / "stale", tiles=data["other_tiles"])
    assert (
        data["features"] in str(error.value) and data["other_tiles"] in str(error.value) and "rerun" in str(error.value)
    )
    assert not (tmp_path / "stale/model.pt").exists()
    run(data, tmp_path / "ok")
    model = load_segmenter(tmp_path / "ok/model.pt", {})
    with pytest.raises(StaleCacheError, match="tile112o32"):
        evaluate_model(model, "head", data["prepared"], data["other_tiles"], data["features"], torch.device("cpu"))


def test_resume_fingerprint_covers_tiles_split_weights_and_code(data, tmp_path):
    split = str(data["root"] / "fibsem.split0.json")
    base = resume_fingerprint({"regime": "head"}, {"fibsem": data["tiles"]}, {"fibsem": split}, "random-init:a", "c0de")
    assert base == resume_fingerprint(
        {"regime": "head"}, {"fibsem": data["tiles"]}, {"fibsem": split}, "random-init:a", "c0de"
    )
    edited = tmp_path / "split.json"
    payload = json.loads(open(split).read())
    payload["val"] = payload["train"][:1]  # same file name elsewhere, other contents
    edited.write_text(json.dumps(payload))
    variants = [
        resume_fingerprint(
            {"regime": "head"}, {"fibsem": data["other_tiles"]}, {"fibsem": split}, "random-init:a", "c0de"
        ),
        resume_fingerprint(
            {"regime": "head"}, {"fibsem": data["tiles"]}, {"fibsem": str(edited)}, "random-init:a", "c0de"
        ),
        resume_fingerprint({"regime": "head"}, {"fibsem": data["tiles"]}, {"fibsem": split}, "random-init:b", "c0de"),
        resume_fingerprint({"regime": "head"}, {"fibsem": data["tiles"]}, {"fibsem": split}, "random-init:a", "beef"),
    ]
    assert base not in variants and len(set(variants)) == 4


def test_a_checkpoint_of_other_code_or_split_is_not_resumed(data, tmp_path):
    training = {**TRAINING, "max_epochs": 4, "patience": 10}
    with pytest.raises(InterruptedError):
        run(data, tmp_path, training=training, code="aaaa", stop_after_epochs=1)
    assert run(data, tmp_path, training=training, code="bbbb")["resumed_from_epoch"] == 0
    with pytest.raises(InterruptedError):
        run(data, tmp_path, training=training, code="aaaa", stop_after_epochs=1)
    split = tmp_path / "split.json"
    shutil.copy(data["root"] / "fibsem.split0.json", split)
    payload = json.loads(split.read_text())
    payload["val"], payload["train"] = payload["train"][:1], payload["train"][1:] + payload["val"]
    split.write_text(json.dumps(payload))
    assert run(data, tmp_path, training=training, code="aaaa", split=str(split))["resumed_from_epoch"] == 0
    with pytest.raises(InterruptedError):
        run(data, tmp_path, training=training, code="aaaa", stop_after_epochs=1)
    assert run(data, tmp_path, training=training, code="aaaa")["resumed_from_epoch"] == 1
