"""Splits of a stack: the published shuffle, one contiguous block with a gap, k folds."""

from __future__ import annotations

import numpy as np
import pytest

from em_foundation.config import ConfigError
from em_foundation.data.em_datasets import vnc_split
from em_foundation.data.splits import held_out_block, labelled_subset, section_order, validation_split

SECTIONS = [f"{i:02d}" for i in range(20)]


def test_shuffle_is_the_published_rule():
    train, test, dropped = vnc_split(SECTIONS, 3, 0)
    assert test == sorted(np.random.default_rng(0).permutation(SECTIONS)[:3].tolist()) and not dropped
    assert len(train) == 17 and not set(train) & set(test)


def test_contiguous_block_with_gap():
    train, test, dropped = vnc_split(SECTIONS, 3, 0, split="contiguous", gap=2)
    assert test == ["17", "18", "19"] and dropped == ["15", "16"] and train == SECTIONS[:15]
    train, test, dropped = vnc_split(SECTIONS, 3, 0, split="contiguous", gap=1, test_start=5)
    assert test == ["05", "06", "07"] and dropped == ["04", "08"] and len(train) == 15
    with pytest.raises(ConfigError, match="does not fit"):
        vnc_split(SECTIONS, 3, 0, split="contiguous", test_start=18)


def test_kfold_tests_every_section_exactly_once():
    tested, kept_neighbours = [], []
    for fold in range(4):
        train, test, dropped = vnc_split(SECTIONS, 3, 0, split="kfold", n_folds=4, fold=fold, gap=1)
        assert set(train) | set(test) | set(dropped) == set(SECTIONS) and not set(train) & set(test)
        tested += test
        index = [SECTIONS.index(s) for s in test]
        assert index == list(range(index[0], index[-1] + 1)), "a fold is one block of consecutive sections"
        kept_neighbours += [s for s in train if min(abs(SECTIONS.index(s) - i) for i in index) <= 1]
    assert sorted(tested) == SECTIONS and not kept_neighbours
    with pytest.raises(ConfigError, match="n_folds"):
        vnc_split(SECTIONS, 3, 0, split="kfold", n_folds=4, fold=4)


def test_section_order_is_numeric():
    assert section_order(["10", "9", "100"]) == ["9", "10", "100"]
    assert section_order(["b", "a"]) == ["a", "b"]
    with pytest.raises(ValueError, match="split"):
        held_out_block(SECTIONS, 3, "random")


def test_validation_split_shuffle_unchanged_and_contiguous_with_gap():
    names = [str(i) for i in range(30)]
    shuffled = validation_split(names, 0.1, 3)
    ordered = sorted(names)
    assert shuffled["val"] == sorted(ordered[i] for i in np.random.default_rng(3).permutation(30)[:3])
    assert shuffled["dropped"] == [] and len(shuffled["train"]) == 27
    blocks = set()
    for seed in range(5):
        split = validation_split(names, 0.1, seed, mode="contiguous", gap=2)
        val = [int(v) for v in split["val"]]
        assert val == list(range(val[0], val[0] + 3))
        assert all(min(abs(int(t) - v) for v in val) > 2 for t in split["train"])
        assert len(split["dropped"]) == 4 - (val[0] < 2) * (2 - val[0]) - (val[-1] > 27) * (val[-1] - 27)
        blocks.add(val[0])
    assert len(blocks) > 1, "the block's position depends on the seed"


def test_training_leaves_out_the_dropped_slices(tmp_path):
    from em_foundation.data.prepared import read_split
    from em_foundation.io import write_json
    from em_foundation.training.run import load_training_data
    from tests.helpers import make_dataset

    paths = make_dataset(tmp_path, "stack", "sstem", n_train=8, n_test=1, size=112)
    names = read_split(paths["prepared"], "train").names
    split = validation_split(names, 0.25, 0, mode="contiguous", gap=1)
    write_json(tmp_path / "split.json", split)
    train, val, record = load_training_data(
        "head",
        ["stack"],
        {"stack": paths["tiles"]},
        {"stack": paths["features"]},
        {"stack": str(tmp_path / "split.json")},
    )
    assert record["stack"]["dropped_slices"] == split["dropped"] and split["dropped"]
    assert len(train) == len(split["train"]) and len(val) == len(split["val"])  # one 112-pixel tile per slice


def test_real_vnc_contiguous_split(shared_data, tmp_path):
    from em_foundation.data.convert import prepare_dataset
    from em_foundation.data.prepared import read_split

    archive = shared_data("groundtruth-drosophila-vnc-master.zip")
    spec = {
        "converter": "vnc",
        "url": None,
        "sha256": None,
        "foreground_fraction": [0.0, 1.0],
        "options": {"split": "contiguous", "n_test": 3, "gap": 1},
    }
    prepare_dataset("vnc", spec, archive, tmp_path / "vnc.h5", tmp_path / "vnc.json")
    assert read_split(tmp_path / "vnc.h5", "test").names == ["17", "18", "19"]
    assert read_split(tmp_path / "vnc.h5", "train").names == SECTIONS[:16]


def test_labelled_subsets_are_nested_seeded_and_never_take_validation_slices():
    names = [str(k) for k in range(20)]
    split = validation_split(names, 0.15, 3)
    sizes = [1, 2, 4, 8]
    subsets = {n: labelled_subset(split["train"], n, 3) for n in sizes}
    for small, large in zip(sizes, sizes[1:]):
        assert set(subsets[small]) < set(subsets[large]), "the smaller labelled set must lie inside the larger"
    assert all(len(subsets[n]) == n for n in sizes)
    assert not set(subsets[8]) & set(split["val"]), "a validation slice entered training"
    assert labelled_subset(split["train"], 4, 3) == subsets[4], "same seed, same slices"
    assert labelled_subset(split["train"], 4, 4) != subsets[4], "different seeds draw different slices"
    assert labelled_subset(split["train"], "all", 3) == split["train"]
    assert labelled_subset(split["train"], 100, 3) == split["train"], "more than there are: all of them"
    # order-free: the draw depends on the names, not on the order the split lists them in
    assert set(labelled_subset(split["train"][::-1], 4, 3)) == set(subsets[4])
    with pytest.raises(ValueError, match="n_train_slices"):
        labelled_subset(split["train"], 0, 3)


def test_training_trains_on_the_labelled_subset_only(tmp_path):
    from em_foundation.data.prepared import read_split
    from em_foundation.io import write_json
    from em_foundation.training.run import load_training_data
    from tests.helpers import make_dataset

    paths = make_dataset(tmp_path, "stack", "sstem", n_train=8, n_test=1, size=112)
    names = read_split(paths["prepared"], "train").names
    split = validation_split(names, 0.25, 0)
    write_json(tmp_path / "split.json", split)
    args = ("head", ["stack"], {"stack": paths["tiles"]}, {"stack": paths["features"]})
    train, val, record = load_training_data(*args, {"stack": str(tmp_path / "split.json")}, n_train_slices="2", seed=5)
    assert record["stack"]["labelled_slices"] == labelled_subset(split["train"], 2, 5)
    assert len(train) == 2 and len(val) == len(split["val"])  # one 112-pixel tile per slice


def test_validation_split_follows_the_test_split_by_default():
    from em_foundation.data.splits import validation_mode, validation_split

    assert validation_mode("auto", None, {"split": "kfold", "gap": 2})[:2] == ("contiguous", 2)
    assert validation_mode("auto", None, {"split": "contiguous", "gap": 1})[:2] == ("contiguous", 1)
    assert validation_mode("auto", None, {"split": "shuffle"})[:2] == ("shuffle", 0)
    assert validation_mode("auto", None, None)[:2] == ("shuffle", 0)  # a separate test volume
    assert validation_mode("shuffle", 0, {"split": "kfold", "gap": 2})[:2] == ("shuffle", 0)
    assert "kfold" in validation_mode("auto", None, {"split": "kfold", "gap": 2})[2]
    mode, gap, _ = validation_mode("auto", None, {"split": "kfold", "gap": 2})
    split = validation_split([str(i) for i in range(40)], 0.1, 0, mode, gap)
    val = sorted(int(v) for v in split["val"])
    assert val == list(range(val[0], val[0] + 4)) and len(split["dropped"]) >= 2
    with pytest.raises(ValueError, match="training.val_split 'blocks'"):
        validation_mode("blocks", None, None)
