"""A comparable optimisation budget at every label budget: a minimum of optimiser steps and
patience in steps (training.min_steps, training.patience_steps), recorded in run.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import em_foundation.training.trainer as trainer
from em_foundation.config import ConfigError, load_config, validate_config
from em_foundation.training.segmenter import CachedFeatureSegmenter
from tests.helpers import HEAD, TRAINING, make_dataset


def tiny_fit(tmp_path, n_train: int, **settings):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((n_train + 2, 6, 4, 4)).astype(np.float16)
    labels = rng.integers(0, 2, (n_train + 2, 16, 16)).astype(np.uint8)
    train = trainer.TrainingData(tokens[:n_train], labels[:n_train], np.array(["a"] * n_train), torch.from_numpy)
    val = trainer.TrainingData(tokens[n_train:], labels[n_train:], np.array(["a"] * 2), torch.from_numpy)
    torch.manual_seed(0)
    model = CachedFeatureSegmenter(in_channels=6, width=8, patch_size=4)
    return trainer.fit(
        model,
        train,
        val,
        {**TRAINING, "batch_size": 2, **settings},
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
        tmp_path / "ckpt.pt",
        "fp",
    )


def test_a_small_run_makes_at_least_min_steps_even_past_max_epochs(tmp_path):
    # 2 tiles, batch 2: one step an epoch, so 4 epochs would make 4 steps
    result = tiny_fit(tmp_path, n_train=2, max_epochs=4, patience=1, min_steps=10)
    assert result.steps_run >= 10
    assert len(result.history) == result.steps_run == 10  # stops as soon as both rules allow
    assert list(result.history["step"]) == list(range(1, 11))


def test_patience_counts_optimiser_steps_when_set(tmp_path, monkeypatch):
    losses = iter([1.0] + [2.0] * 100)  # the first epoch is the best, no later one improves
    monkeypatch.setattr(trainer, "validation_losses", lambda *args, **kwargs: (next(losses), {}))
    # 4 tiles, batch 2: two steps an epoch; the best at step 2, so 6 steps later is step 8
    result = tiny_fit(tmp_path, n_train=4, max_epochs=50, patience=100, patience_steps=6)
    assert result.stop_reason == "early_stopping"
    assert (result.best_step, result.steps_run, len(result.history)) == (2, 8, 4)


def test_without_the_new_keys_the_published_epoch_rule_holds(tmp_path, monkeypatch):
    losses = iter([1.0] + [2.0] * 100)
    monkeypatch.setattr(trainer, "validation_losses", lambda *args, **kwargs: (next(losses), {}))
    result = tiny_fit(tmp_path, n_train=4, max_epochs=50, patience=3)
    assert (result.stop_reason, len(result.history), result.steps_run) == ("early_stopping", 4, 8)


def test_the_published_config_keeps_the_epoch_rule():
    from tests.test_published_setup import REPO

    training = load_config(REPO / "config.yaml")["training"]
    assert (training["min_steps"], training["patience_steps"]) == (0, None)


def test_a_one_slice_run_records_its_steps_and_validation_slices(tmp_path):
    from em_foundation.training.run import train_run

    data = make_dataset(tmp_path, "fibsem", "fibsem", n_train=5, seed=1)
    record = train_run(
        regime="head",
        backbone_name="filterbank",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=0,
        backbone={},
        head=HEAD,
        lora={},
        training={**TRAINING, "max_epochs": 2, "min_steps": 12, "patience_steps": 5},
        tiles={"fibsem": data["tiles"]},
        features={"fibsem": data["features"]},
        splits={"fibsem": str(tmp_path / "fibsem.split0.json")},
        device=torch.device("cpu"),
        out_model=tmp_path / "model.pt",
        out_log=tmp_path / "log.csv",
        out_run=tmp_path / "run.json",
        n_train_slices="1",
    )
    assert record["n_labelled_slices"] == 1 and record["n_validation_slices"] >= 1
    assert record["steps_run"] >= 12 and record["epochs_run"] > 2  # past max_epochs to reach min_steps
    assert 1 <= record["best_step"] <= record["steps_run"]


@pytest.mark.parametrize(("key", "value"), [("min_steps", -1), ("patience_steps", 0)])
def test_bad_budget_values_name_the_key(key, value):
    from tests.test_config import demo_config

    config = demo_config()
    config["training"][key] = value
    with pytest.raises(ConfigError, match=rf"training\.{key}"):
        validate_config(config)
