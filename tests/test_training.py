"""Training: head training never runs the backbone, seeds matter and repeat exactly,
a killed run resumes to the same result, and balanced sampling draws equally."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import em_foundation.backbones as backbones_module
import em_foundation.training.segmenter as segmenter_module
from em_foundation.backbones.base import Backbone
from em_foundation.evaluation.evaluate import evaluate_model, pooled_scores
from em_foundation.training.run import load_segmenter, train_run
from em_foundation.training.sampling import epoch_batches
from em_foundation.training.segmenter import build_segmenter
from tests.helpers import HEAD, LORA, TINY_VIT, TRAINING, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "fibsem": make_dataset(root, "fibsem", "fibsem", seed=1),
        "sstem": make_dataset(root, "sstem", "sstem", n_train=2, seed=2),
        "root": root,
    }


def run_head(data, out: Path, seed: int, datasets=("fibsem",), **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    return train_run(
        regime="head",
        backbone_name="filterbank",
        train_set="+".join(datasets),
        datasets=list(datasets),
        seed=seed,
        backbone={},
        head=HEAD,
        lora={},
        training=kwargs.pop("training", TRAINING),
        tiles={d: data[d]["tiles"] for d in datasets},
        features={d: data[d]["features"] for d in datasets},
        splits={d: str(data["root"] / f"{d}.split{seed}.json") for d in datasets},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "train_log.csv",
        out_run=out / "run.json",
        **kwargs,
    )


def score(data, model_path: Path, test_set="fibsem"):
    model = load_segmenter(model_path, {})
    per_image, _ = evaluate_model(
        model,
        "head",
        data[test_set]["prepared"],
        data[test_set]["tiles"],
        data[test_set]["features"],
        torch.device("cpu"),
    )
    return pooled_scores(per_image)


def test_head_training_never_calls_the_backbone(data, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone was built or run during head training")

    monkeypatch.setattr(backbones_module, "build_backbone", forbidden)
    monkeypatch.setattr(segmenter_module, "build_backbone", forbidden)
    monkeypatch.setattr(Backbone, "__call__", forbidden)
    record = run_head(data, tmp_path, seed=0)
    assert record["epochs_run"] >= 1
    model = load_segmenter(tmp_path / "model.pt", {})
    assert not any(isinstance(module, Backbone) for module in model.modules())


def test_same_seed_gives_identical_metrics(data, tmp_path):
    run_head(data, tmp_path / "a", seed=3)
    run_head(data, tmp_path / "b", seed=3)
    # NaN-aware (a matched IoU without matches is NaN), yet exact
    np.testing.assert_equal(score(data, tmp_path / "a/model.pt"), score(data, tmp_path / "b/model.pt"))
    log_a = (tmp_path / "a/train_log.csv").read_text().splitlines()
    log_b = (tmp_path / "b/train_log.csv").read_text().splitlines()
    assert [line.rsplit(",", 1)[0] for line in log_a] == [line.rsplit(",", 1)[0] for line in log_b]


def test_five_seeds_record_five_seeds_and_differ(data, tmp_path):
    records, ious = [], []
    for seed in range(5):
        records.append(run_head(data, tmp_path / f"s{seed}", seed=seed))
        ious.append(score(data, tmp_path / f"s{seed}/model.pt")["fg_iou"])
    assert [r["seed"] for r in records] == list(range(5))
    assert [json.loads((tmp_path / f"s{s}/run.json").read_text())["seed"] for s in range(5)] == list(range(5))
    assert len(set(ious)) > 1, f"five seeds gave identical IoUs {ious}"
    assert len({tuple(r["data"]["fibsem"]["val_slices"]) for r in records}) > 1, (
        "validation splits do not depend on the seed"
    )


def test_killed_training_resumes_to_the_uninterrupted_result(data, tmp_path):
    training = {**TRAINING, "max_epochs": 5, "patience": 10}
    run_head(data, tmp_path / "full", seed=1, training=training)
    with pytest.raises(InterruptedError):
        run_head(data, tmp_path / "killed", seed=1, training=training, stop_after_epochs=2)
    assert (tmp_path / "killed/checkpoint.pt").exists() and not (tmp_path / "killed/model.pt").exists()
    record = run_head(data, tmp_path / "killed", seed=1, training=training)
    assert record["resumed_from_epoch"] == 2
    assert not (tmp_path / "killed/checkpoint.pt").exists()
    full = torch.load(tmp_path / "full/model.pt", weights_only=False)["state"]
    resumed = torch.load(tmp_path / "killed/model.pt", weights_only=False)["state"]
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0)


def test_checkpoint_of_another_configuration_is_not_resumed(data, tmp_path):
    with pytest.raises(InterruptedError):
        run_head(data, tmp_path, seed=1, stop_after_epochs=1)
    record = run_head(data, tmp_path, seed=1, training={**TRAINING, "lr": 5e-4})
    assert record["resumed_from_epoch"] == 0


def test_balanced_sampling_draws_equally_from_each_source():
    sources = np.array(["lucchi"] * 100 + ["vnc"] * 10)
    batches = epoch_batches(sources, 4, torch.Generator().manual_seed(0), balanced=True)
    drawn = np.concatenate(batches)
    assert len(batches) == 28
    assert (sources[drawn] == "lucchi").sum() == (sources[drawn] == "vnc").sum() == 56
    assert all((sources[b] == "vnc").sum() == 2 for b in batches)
    shuffled = np.concatenate(epoch_batches(sources, 4, torch.Generator().manual_seed(0), balanced=False))
    assert sorted(shuffled) == list(range(110))


def test_paired_training_records_draws_per_source(data, tmp_path):
    record = run_head(
        data, tmp_path, seed=0, datasets=("fibsem", "sstem"), training={**TRAINING, "balanced_sampling": True}
    )
    drawn = record["tiles_drawn_per_source"]
    assert drawn["fibsem"] == drawn["sstem"] > 0


def test_per_source_validation_loss_weighs_each_source_equally():
    from em_foundation.training.losses import soft_dice_loss
    from em_foundation.training.trainer import TrainingData, validation_losses

    class Echo(torch.nn.Module):  # the inputs are the logits
        def forward(self, inputs, out_size):
            return inputs

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(12, 8, 8)).astype(np.uint8)
    logits = rng.normal(size=(12, 2, 8, 8)).astype(np.float32)
    logits[10:] += np.stack([labels[10:] == 0, labels[10:] == 1], axis=1) * 4.0  # the small source is predicted well
    sources = np.array(["big"] * 10 + ["small"] * 2)
    data = TrainingData(logits, labels, sources, to_tensor=torch.from_numpy)
    pooled, per_source = validation_losses(Echo(), data, 4, torch.device("cpu"), "pooled")
    balanced, same = validation_losses(Echo(), data, 4, torch.device("cpu"), "per_source")
    assert same == per_source and set(per_source) == {"big", "small"}
    expected_small = soft_dice_loss(torch.from_numpy(logits[10:]), torch.from_numpy(labels[10:])).item()
    assert per_source["small"] == pytest.approx(expected_small)
    assert balanced == pytest.approx((per_source["big"] + per_source["small"]) / 2)
    assert balanced < pooled - 0.05, "the small, well-predicted source counts as much as the big one"
    single = TrainingData(logits[:10], labels[:10], sources[:10], to_tensor=torch.from_numpy)
    assert validation_losses(Echo(), single, 4, torch.device("cpu"), "per_source")[0] == pytest.approx(
        per_source["big"]
    )
    with pytest.raises(ValueError, match="training.val_loss"):
        validation_losses(Echo(), data, 4, torch.device("cpu"), "mean")


def test_paired_training_with_per_source_validation_loss(data, tmp_path):
    import pandas as pd

    run_head(data, tmp_path / "pooled", seed=0, datasets=("fibsem", "sstem"))
    run_head(
        data, tmp_path / "per", seed=0, datasets=("fibsem", "sstem"), training={**TRAINING, "val_loss": "per_source"}
    )
    pooled, per = (pd.read_csv(tmp_path / f"{name}/train_log.csv") for name in ("pooled", "per"))
    assert {"val_loss_fibsem", "val_loss_sstem"} <= set(per.columns)
    assert np.allclose(per["val_loss"], (per["val_loss_fibsem"] + per["val_loss_sstem"]) / 2)
    assert {"val_loss_fibsem", "val_loss_sstem"} <= set(pooled.columns)  # logged either way, to compare


def test_lora_trains_only_adapters_and_head_and_adapters_sit_on_attention():
    model = build_segmenter("lora", TINY_VIT, HEAD, LORA)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("head.") or "lora_" in name for name in trainable)
    adapted = {name.split(".lora_")[0] for name in trainable if "lora_" in name}
    assert adapted == {f"backbone.model.blocks.{i}.attn.{m}" for i in range(2) for m in ("qkv", "proj")}
    assert not any("patch_embed" in name or "mlp" in name for name in adapted)


def test_forest_regime_trains_on_cached_tokens_and_scores(data, tmp_path, monkeypatch):
    monkeypatch.setattr(Backbone, "__call__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("backbone ran")))
    record = train_run(
        regime="forest",
        backbone_name="filterbank",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=0,
        backbone={},
        head={},
        lora={},
        training={},
        forest={"n_estimators": 20, "max_depth": None, "min_samples_leaf": 1, "tokens_per_tile": 32},
        tiles={"fibsem": data["fibsem"]["tiles"]},
        features={"fibsem": data["fibsem"]["features"]},
        splits={"fibsem": str(data["root"] / "fibsem.split0.json")},
        device=torch.device("cpu"),
        out_model=tmp_path / "model.pt",
        out_log=tmp_path / "log.csv",
        out_run=tmp_path / "run.json",
    )
    assert record["tokens_sampled"] > 0 and record["trainable_parameters"] == 0
    model = load_segmenter(tmp_path / "model.pt", {})
    per_image, predictions = evaluate_model(
        model,
        "forest",
        data["fibsem"]["prepared"],
        data["fibsem"]["tiles"],
        data["fibsem"]["features"],
        torch.device("cpu"),
    )
    scores = pooled_scores(per_image)
    assert predictions[0].shape == (128, 128)
    assert scores["fg_iou"] > 0.2, scores


def test_token_labels_follow_the_pixel_majority():
    from em_foundation.training.forest import token_labels

    labels = np.zeros((1, 16, 16), dtype=np.uint8)
    labels[0, :8, :8] = 1
    labels[0, 8:, 8:] = 255
    labels[0, :8, 8:12] = 1  # half of the top-right patch: not a majority
    assert token_labels(labels, 8).tolist() == [[[1, 0], [0, 255]]]


def test_logged_losses_are_the_means_of_the_batch_losses(tmp_path, monkeypatch):
    # fit() reads losses once per epoch instead of once per step; the logged numbers must
    # still be the mean over training batches and the sample-weighted validation mean.
    import em_foundation.training.trainer as trainer
    from em_foundation.training.segmenter import CachedFeatureSegmenter

    seen: list[tuple[bool, float, int]] = []
    real_loss = trainer.soft_dice_loss

    def recording(logits, labels):
        loss = real_loss(logits, labels)
        seen.append((torch.is_grad_enabled(), float(loss.detach()), len(labels)))
        return loss

    monkeypatch.setattr(trainer, "soft_dice_loss", recording)
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((8, 6, 4, 4)).astype(np.float16)
    labels = rng.integers(0, 2, (8, 16, 16)).astype(np.uint8)
    train = trainer.TrainingData(tokens[:5], labels[:5], np.array(["a"] * 5), torch.from_numpy)
    val = trainer.TrainingData(tokens[5:], labels[5:], np.array(["a"] * 3), torch.from_numpy)
    torch.manual_seed(0)
    model = CachedFeatureSegmenter(in_channels=6, width=8, patch_size=4)
    settings = dict(TRAINING, batch_size=2, max_epochs=2, patience=5)
    result = trainer.fit(
        model, train, val, settings, torch.Generator().manual_seed(0), torch.device("cpu"), tmp_path / "ckpt.pt", "fp"
    )
    steps = [(loss, n) for grad, loss, n in seen if grad]
    checks = [(loss, n) for grad, loss, n in seen if not grad]
    assert len(steps) == 6 and len(checks) == 4  # 3 batches of 5 tiles, 2 of 3 tiles, per epoch
    for epoch, row in result.history.iterrows():
        train_part, val_part = steps[3 * epoch : 3 * epoch + 3], checks[2 * epoch : 2 * epoch + 2]
        assert row["train_loss"] == pytest.approx(np.mean([loss for loss, _ in train_part]), rel=1e-6)
        assert row["val_loss"] == pytest.approx(sum(loss * n for loss, n in val_part) / 3, rel=1e-6)


def test_filter_bank_tokens_reach_the_head_standardised_with_training_statistics(data, tmp_path):
    from em_foundation.training.run import load_training_data

    run_head(data, tmp_path, seed=0)
    saved = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    stats = saved["input_standardisation"]
    train, _, _ = load_training_data(
        "head",
        ["fibsem"],
        {"fibsem": data["fibsem"]["tiles"]},
        {"fibsem": data["fibsem"]["features"]},
        {"fibsem": str(data["root"] / "fibsem.split0.json")},
    )
    mean, scale = np.array(stats["mean"])[None, :, None, None], np.array(stats["scale"])[None, :, None, None]
    standardised = (train.inputs.astype(np.float64) - mean) / scale
    # Raw filter-bank channels span orders of magnitude; the head sees every one at unit scale.
    raw_std = train.inputs.astype(np.float64).std(axis=(0, 2, 3))
    assert raw_std.max() / raw_std.min() > 100
    np.testing.assert_allclose(standardised.mean(axis=(0, 2, 3)), 0, atol=1e-6)
    np.testing.assert_allclose(standardised.std(axis=(0, 2, 3)), 1, rtol=1e-3)
    # The statistics travel with the model: evaluation applies the same ones.
    model = load_segmenter(tmp_path / "model.pt", {})
    np.testing.assert_allclose(model.standardiser.mean.flatten().numpy(), stats["mean"], rtol=1e-6)
    np.testing.assert_allclose(model.standardiser.std.flatten().numpy(), stats["scale"], rtol=1e-6)


def test_vit_tokens_reach_the_head_as_published():
    # Only STANDARDISED_FAMILIES get input standardisation; a head without it is the bare DeconvHead.
    model = build_segmenter("head", {}, HEAD, {}, in_channels=6, patch_size=14)
    tokens = torch.randn(1, 6, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens, (28, 28)), model.head(tokens, (28, 28)))
    assert model.standardiser is None
    with pytest.raises(ValueError, match="a mean and a scale for each of the 6 channels"):
        build_segmenter(
            "head",
            {},
            HEAD,
            {},
            in_channels=6,
            patch_size=14,
            input_standardisation={"mean": [0.0] * 5, "scale": [1.0] * 5},
        )


def test_huge_learning_rate_stops_at_the_first_non_finite_loss_and_writes_no_model(data, tmp_path):
    training = {**TRAINING, "lr": 1e6, "max_epochs": 6, "patience": 10}
    with pytest.raises(RuntimeError) as raised:
        run_head(data, tmp_path, seed=0, training=training)
    message = str(raised.value)
    print(message)
    assert "run filterbank/head/fibsem/none/seed0" in message and "epoch 1:" in message
    assert "training.lr (now 1000000.0)" in message and "training.grad_clip (now 1.0)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a diverged run left files behind"


def test_non_finite_validation_loss_after_good_epochs_stops_and_drops_the_checkpoint(data, tmp_path, monkeypatch):
    import em_foundation.training.trainer as trainer_module

    calls = {"n": 0}
    real = trainer_module._validation_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        return float("inf") if calls["n"] == 3 else real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "_validation_loss", poisoned)
    with pytest.raises(RuntimeError, match=r"diverged at epoch 3: the validation loss is inf"):
        run_head(data, tmp_path, seed=0, training={**TRAINING, "max_epochs": 6, "patience": 10})
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize(
    "failure",
    [OSError(28, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")],
    ids=["ENOSPC", "torch-iostream"],
)
def test_a_full_disk_while_writing_a_checkpoint_names_the_file_and_says_so(tmp_path, monkeypatch, failure):
    """torch.save on a full disk raises ENOSPC, or from its C++ writer only 'basic_ios::clear: iostream error'."""
    from em_foundation.io import DiskFullError
    from em_foundation.training import trainer

    def full_disk(payload, path):
        Path(path).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(trainer.torch, "save", full_disk)
    checkpoint = tmp_path / "models" / "checkpoint.pt"
    with pytest.raises(DiskFullError) as caught:
        trainer._save_checkpoint(checkpoint, {"epoch": 1})
    message = str(caught.value)
    assert str(checkpoint) in message and "the disk is full" in message and "MiB free" in message, message
    assert not list(checkpoint.parent.iterdir()), "a partial checkpoint was left behind"


def test_other_write_errors_pass_unchanged(tmp_path, monkeypatch):
    from em_foundation.training import trainer

    def broken(payload, path):
        raise RuntimeError("something else")

    monkeypatch.setattr(trainer.torch, "save", broken)
    with pytest.raises(RuntimeError, match="^something else$"):
        trainer._save_checkpoint(tmp_path / "checkpoint.pt", {})
