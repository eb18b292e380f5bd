"""Streaming inputs from HDF5 (data/streaming.py): the same numbers as reading a split whole,
the mode chosen by the memory check, one slice at a time in evaluation, tile-by-tile forest
sampling, and a feature cache written with overlapped I/O that is byte for byte the sequential one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import em_foundation.data.streaming as streaming
import em_foundation.training.trainer as trainer
from em_foundation.backbones import build_backbone
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.data.streaming import BackgroundWriter, Part, StoredRows, choose_loading, prefetched
from em_foundation.evaluation.evaluate import evaluate_model, pooled_scores
from em_foundation.feature_cache import cache_features
from em_foundation.training.forest import SAMPLE_CHUNK_TILES, fit_forest
from em_foundation.training.run import _concatenate_padded, load_segmenter, load_training_data, train_run
from tests.helpers import FILTERBANK, HEAD, LORA, TINY_VIT, TRAINING, make_dataset

FOREST = {"n_estimators": 10, "max_depth": None, "min_samples_leaf": 1, "tokens_per_tile": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {
        "fibsem": make_dataset(root, "fibsem", "fibsem", seed=1),
        "sstem": make_dataset(root, "sstem", "sstem", n_train=2, seed=2),
        "root": root,
    }


def train(data, out: Path, regime: str, mode: str, datasets=("fibsem", "sstem"), **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    return train_run(
        regime=regime,
        backbone_name="filterbank" if regime != "lora" else "tinyvit",
        train_set="+".join(datasets),
        datasets=list(datasets),
        seed=0,
        backbone=kwargs.pop("backbone", {}),
        head=HEAD,
        lora=LORA,
        training=kwargs.pop("training", TRAINING),
        forest=FOREST,
        tiles={d: data[d]["tiles"] for d in datasets},
        features={d: data[d]["features"] for d in datasets},
        splits={d: str(data["root"] / f"{d}.split0.json") for d in datasets},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "train_log.csv",
        out_run=out / "run.json",
        data_in_memory=mode,
        **kwargs,
    )


def saved_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


@pytest.mark.parametrize("alignment,depth", [("none", 0), ("featstd-balanced", 2)])
def test_head_trains_identically_streamed_and_in_memory(data, tmp_path, monkeypatch, alignment, depth):
    # depth 2: batches read ahead on a background thread, as on a GPU (on a CPU they are read in line)
    monkeypatch.setattr(trainer, "prefetch_depth", lambda device: depth)
    records = {mode: train(data, tmp_path / mode, "head", mode, alignment=alignment) for mode in ("always", "never")}
    assert records["always"]["data_loading"]["mode"] == "in-memory"
    assert records["never"]["data_loading"]["mode"] == "streaming"
    logs = {mode: pd.read_csv(tmp_path / mode / "train_log.csv").drop(columns="seconds") for mode in records}
    pd.testing.assert_frame_equal(logs["always"], logs["never"], check_exact=True)
    always, never = saved_state(tmp_path / "always" / "model.pt"), saved_state(tmp_path / "never" / "model.pt")
    assert always.keys() == never.keys()
    for key in always:
        assert torch.equal(always[key], never[key]), key
    assert records["always"]["tiles_drawn_per_source"] == records["never"]["tiles_drawn_per_source"]


def test_lora_trains_identically_streamed_and_in_memory(data, tmp_path):
    training = {**TRAINING, "max_epochs": 2}
    for mode in ("always", "never"):
        train(data, tmp_path / mode, "lora", mode, datasets=("sstem",), backbone=TINY_VIT, training=training)
    logs = {
        mode: pd.read_csv(tmp_path / mode / "train_log.csv").drop(columns="seconds") for mode in ("always", "never")
    }
    pd.testing.assert_frame_equal(logs["always"], logs["never"], check_exact=True)
    always, never = saved_state(tmp_path / "always" / "model.pt"), saved_state(tmp_path / "never" / "model.pt")
    assert all(torch.equal(always[key], never[key]) for key in always)


def test_stored_rows_read_in_any_order_and_pad_like_the_whole_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (5, 6, 9), dtype=np.uint8), rng.integers(0, 255, (4, 8, 7), dtype=np.uint8)]
    parts = []
    for k, array in enumerate(arrays):
        path = tmp_path / f"{k}.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset("train/labels", data=array, chunks=(1, *array.shape[1:]))
        rows = np.array([0, 2, 3, 4]) if k == 0 else np.arange(4)
        parts.append(Part(str(path), "train", "labels", rows))
    rows = StoredRows(parts, IGNORE_LABEL)
    whole = _concatenate_padded([arrays[0][[0, 2, 3, 4]], arrays[1]], IGNORE_LABEL)
    assert rows.shape == whole.shape == (8, 8, 9)
    np.testing.assert_array_equal(rows[:], whole)
    index = np.array([6, 1, 1, 7, 0, 3])  # unsorted, repeated, across both parts
    np.testing.assert_array_equal(rows[index], whole[index])
    np.testing.assert_array_equal(rows[2:5], whole[2:5])
    mask = np.zeros(8, dtype=bool)
    mask[[1, 5, 6]] = True
    np.testing.assert_array_equal(rows.select(mask)[:], whole[mask])
    np.testing.assert_array_equal(np.asarray(rows), whole)  # code written for arrays still works


def test_the_memory_check_chooses_the_mode_and_says_why(data, monkeypatch):
    args = ("head", ["fibsem"], {"fibsem": data["fibsem"]["tiles"]}, {"fibsem": data["fibsem"]["features"]})
    splits = {"fibsem": str(data["root"] / "fibsem.split0.json")}
    monkeypatch.setattr(streaming, "available_memory", lambda: 10 * 2**30)
    roomy, _, _ = load_training_data(*args, splits)
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    tight, _, _ = load_training_data(*args, splits)
    assert roomy.loading["mode"] == "in-memory" and isinstance(roomy.inputs, np.ndarray)
    assert tight.loading["mode"] == "streaming" and isinstance(tight.inputs, StoredRows)
    assert "more than 50%" in tight.loading["reason"] and "within 50%" in roomy.loading["reason"]
    np.testing.assert_array_equal(roomy.inputs, tight.inputs[:])
    np.testing.assert_array_equal(roomy.labels, tight.labels[:])
    # the forced modes ignore the memory check
    forced, _, _ = load_training_data(*args, splits, data_in_memory="always")
    assert forced.loading == {
        "mode": "in-memory",
        "reason": "compute.data_in_memory is always",
        "bytes": forced.loading["bytes"],
    }
    with pytest.raises(ValueError, match="compute.data_in_memory is 'sometimes'"):
        choose_loading(1, "sometimes")


def test_evaluation_is_identical_and_reads_one_slice_at_a_time(data, tmp_path, monkeypatch):
    train(data, tmp_path / "run", "head", "always", datasets=("fibsem",))
    model = load_segmenter(tmp_path / "run" / "model.pt", {})
    paths = data["fibsem"]
    reads = []
    original = Part.read

    def spy(self, rows):
        reads.append((self.split, len(rows)))
        return original(self, rows)

    monkeypatch.setattr(Part, "read", spy)
    results = {}
    for alignment in ("none", "featstd-adabn"):
        for mode in ("always", "never"):
            reads.clear()
            per_image, predictions = evaluate_model(
                model,
                "head",
                paths["prepared"],
                paths["tiles"],
                paths["features"],
                torch.device("cpu"),
                alignment=alignment,
                data_in_memory=mode,
            )
            results[alignment, mode] = (per_image, predictions, list(reads))
        pd.testing.assert_frame_equal(results[alignment, "always"][0], results[alignment, "never"][0], check_exact=True)
        for a, b in zip(results[alignment, "always"][1], results[alignment, "never"][1]):
            np.testing.assert_array_equal(a, b)
    tiles_per_slice = 4  # 128² slices in 112-pixel tiles with 16 overlap
    test_reads = [n for split, n in results["none", "never"][2] if split == "test"]
    assert len(test_reads) == 2 and max(test_reads) == tiles_per_slice  # two test slices, one read each
    assert [n for split, n in results["none", "always"][2] if split == "test"] == [2 * tiles_per_slice]
    # AdaBN's pass over the training split reads one batch at a time
    assert max(n for split, n in results["featstd-adabn", "never"][2] if split == "train") <= 8
    assert pooled_scores(results["none", "never"][0])["n_images"] == 2


def test_forest_samples_tile_chunks_and_matches_the_whole_split(data, tmp_path, monkeypatch):
    reads = []
    original = StoredRows.__getitem__

    def spy(self, index):
        values = original(self, index)
        reads.append(len(values))
        return values

    monkeypatch.setattr(StoredRows, "__getitem__", spy)
    records = {mode: train(data, tmp_path / mode, "forest", mode) for mode in ("always", "never")}
    assert max(reads) <= SAMPLE_CHUNK_TILES
    forests = {mode: torch.load(tmp_path / mode / "model.pt", weights_only=False)["forest"] for mode in records}
    probe = np.random.default_rng(0).normal(size=(200, 29)).astype(np.float32)
    np.testing.assert_array_equal(forests["always"].predict_proba(probe), forests["never"].predict_proba(probe))
    assert records["always"]["tokens_sampled"] == records["never"]["tokens_sampled"]
    assert records["always"]["best_val_loss"] == pytest.approx(records["never"]["best_val_loss"], abs=1e-6)
    # the sample does not depend on how many tiles are read at a time
    train_data = load_training_data(
        "head",
        ["fibsem"],
        {"fibsem": data["fibsem"]["tiles"]},
        {"fibsem": data["fibsem"]["features"]},
        {"fibsem": str(data["root"] / "fibsem.split0.json")},
        data_in_memory="always",
    )[0]
    one, n_one = fit_forest(train_data.inputs, train_data.labels, 8, FOREST, seed=0, chunk_tiles=1)
    whole, n_whole = fit_forest(train_data.inputs, train_data.labels, 8, FOREST, seed=0, chunk_tiles=10**6)
    assert n_one == n_whole
    np.testing.assert_array_equal(one.predict_proba(probe), whole.predict_proba(probe))


def test_caching_with_overlapped_io_writes_the_same_bytes(data, tmp_path):
    backbone = build_backbone(FILTERBANK)
    paths = {}
    for overlap in (False, True):
        paths[overlap] = tmp_path / f"overlap{overlap}.h5"
        cache_features(
            backbone,
            data["fibsem"]["tiles"],
            paths[overlap],
            3,
            torch.device("cpu"),
            {"backbone": "t"},
            overlap_io=overlap,
        )
    assert paths[False].read_bytes() == paths[True].read_bytes()


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    seen = []
    assert list(prefetched(range(10), lambda i: seen.append(i) or i * i)) == [i * i for i in range(10)]

    def failing(i):
        if i == 3:
            raise KeyError("tile 3")
        return i

    got = []
    with pytest.raises(KeyError, match="tile 3"):
        for value in prefetched(range(10), failing):
            got.append(value)
    assert got == [0, 1, 2]
    before = threading.active_count()
    loaded = []
    for value in prefetched(range(1000), lambda i: loaded.append(i) or i, depth=2):
        if value == 1:
            break
    time.sleep(0.3)
    assert threading.active_count() == before and len(loaded) < 10  # bounded read-ahead, thread gone


def test_background_writer_writes_in_order_and_reports_errors():
    written = []
    with BackgroundWriter(written.append, depth=2) as writer:
        for i in range(20):
            writer.put(i)
    assert written == list(range(20))

    def broken(item):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(broken, depth=2) as writer:
            writer.put(1)


def test_stack_object_counts_read_only_the_masks(data):
    from em_foundation.data.prepared import read_split
    from em_foundation.evaluation.evaluate import stack_object_counts
    from em_foundation.evaluation.objects import stack_counts

    truth = read_split(data["fibsem"]["prepared"], "test")
    rng = np.random.default_rng(0)
    predictions = [(rng.random(label.shape) > 0.7).astype(np.uint8) for label in truth.labels]
    expected = stack_counts(predictions, list(truth.labels), 5, three_d=True)  # names sort in file order here
    assert stack_object_counts(data["fibsem"]["prepared"], predictions, 5) == expected
