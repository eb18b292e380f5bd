"""The supervised U-Net (family unet, regime supervised) and training.augment.

The U-Net trains every parameter, resumes like the other regimes, repeats exactly on CPU,
answers at the tile size of every view, loads ImageNet encoder weights only from what
fetch_weights put in the cache (a file the test writes here); flips and rotations are
seeded and move labels with their pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from em_foundation.backbones.checkpoint import WeightsError
from em_foundation.backbones.hub import hub_environment
from em_foundation.backbones.parameters import count_parameters
from em_foundation.config import validate_config
from em_foundation.grid import feature_backbones, runs
from em_foundation.training.augment import augment_batch
from em_foundation.training.run import load_segmenter, train_run
from em_foundation.training.segmenter import build_segmenter
from em_foundation.training.trainer import make_optimizer, train_step
from tests.helpers import TRAINING, make_dataset

REPO = Path(__file__).resolve().parents[1]
NARROW = {
    "family": "unet",
    "weights": "random",
    "options": {"encoder": "resnet18", "encoder_depth": 2, "decoder_channels": [8, 8]},
}


def unet(**changes) -> torch.nn.Module:
    return build_segmenter("supervised", {**NARROW, **changes}, {}, {})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"fibsem": make_dataset(root, "fibsem", "fibsem", n_train=3, seed=1), "root": root}


def run_unet(data, out: Path, seed: int, training: dict | None = None, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    return train_run(
        regime="supervised",
        backbone_name="unet",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=seed,
        backbone=NARROW,
        head={},
        lora={},
        training=training or {**TRAINING, "max_epochs": 2},
        tiles={"fibsem": data["fibsem"]["tiles"]},
        features=None,
        splits={"fibsem": str(data["root"] / f"fibsem.split{seed}.json")},
        device=torch.device("cpu"),
        out_model=out / "model.pt",
        out_log=out / "train_log.csv",
        out_run=out / "run.json",
        **kwargs,
    )


def test_every_parameter_trains():
    torch.manual_seed(0)
    model = unet().train()
    parameters = list(model.parameters())
    assert parameters and all(p.requires_grad for p in parameters)
    # the depth-2 encoder keeps no stage it never runs (smp keeps layer2..layer4)
    assert not any(
        name.startswith(("model.encoder.layer2", "model.encoder.layer3")) for name, _ in model.named_parameters()
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(parameters, {"lr": 1e-2, "weight_decay": 0.0})
    images = torch.rand(4, 1, 32, 32)
    labels = (images[:, 0] > 0.5).long()
    for _ in range(3):
        train_step(model, parameters, optimizer, images, labels, grad_clip=1.0)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    counts = count_parameters(NARROW, "supervised", 32, {})
    assert counts["trainable_params"] == counts["total_params"] == sum(p.numel() for p in parameters)


@pytest.mark.parametrize(("height", "width"), [(112, 112), (448, 448), (47, 63), (752, 1008)])
def test_output_is_at_the_input_size_of_any_view(height, width):
    # depth 5: stride 32, which none of 112, 47, 63 or 752 is a multiple of (padded inside, cropped back)
    model = unet(options={"encoder": "resnet18", "encoder_depth": 5, "decoder_channels": [8, 8, 8, 8, 8]}).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, height, width), (height, width)).shape == (1, 2, height, width)
        assert model(torch.rand(1, 1, height, width), (20, 30)).shape == (1, 2, 20, 30)
    with pytest.raises(ValueError, match="grayscale"):
        model(torch.rand(1, 3, 32, 32), (32, 32))


def test_unknown_encoder_and_mismatched_decoder_are_refused():
    with pytest.raises(ValueError, match="ResNet encoders"):
        unet(options={"encoder": "mobilenet_v2"})
    with pytest.raises(ValueError, match="decoder_channels"):
        unet(options={"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [8, 8]})
    with pytest.raises(ValueError, match="does not run regime"):
        build_segmenter("fullft", NARROW, {"width": 8}, {})


def test_same_seed_same_weights_and_other_seeds_differ(data, tmp_path):
    first = run_unet(data, tmp_path / "a", seed=0)
    again = run_unet(data, tmp_path / "b", seed=0)
    other = run_unet(data, tmp_path / "c", seed=1)
    assert first["trainable_parameters"] == sum(p.numel() for p in unet().parameters())
    state = {k: torch.load(tmp_path / f"{k}/model.pt", weights_only=False)["state"] for k in "abc"}
    assert state["a"].keys() == state["b"].keys()
    for key in state["a"]:
        torch.testing.assert_close(state["a"][key], state["b"][key], rtol=0, atol=0)
    assert first["best_val_loss"] == again["best_val_loss"]
    assert other["best_val_loss"] != first["best_val_loss"]
    weights = [k for k, v in state["a"].items() if v.is_floating_point()]
    assert any(not torch.equal(state["a"][k], state["c"][k]) for k in weights)


def test_killed_training_resumes_to_the_uninterrupted_result(data, tmp_path):
    # with augmentation on, so the generator's draws must resume exactly too
    training = {**TRAINING, "max_epochs": 3, "patience": 10, "augment": "flips_rot90"}
    run_unet(data, tmp_path / "full", seed=2, training=training)
    with pytest.raises(InterruptedError):
        run_unet(data, tmp_path / "killed", seed=2, training=training, stop_after_epochs=1)
    assert (tmp_path / "killed/checkpoint.pt").exists() and not (tmp_path / "killed/model.pt").exists()
    record = run_unet(data, tmp_path / "killed", seed=2, training=training)
    assert record["resumed_from_epoch"] == 1 and record["augment"] == "flips_rot90"
    full = torch.load(tmp_path / "full/model.pt", weights_only=False)["state"]
    resumed = torch.load(tmp_path / "killed/model.pt", weights_only=False)["state"]
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0)
    # the model rebuilds from its checkpoint alone and scores tiles at their size
    model = load_segmenter(tmp_path / "full/model.pt", NARROW)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 112, 112), (112, 112)).shape == (2, 2, 112, 112)


def test_augmentation_changes_the_run_only_when_asked(data, tmp_path):
    plain = run_unet(data, tmp_path / "plain", seed=3)
    augmented = run_unet(
        data, tmp_path / "aug", seed=3, training={**TRAINING, "max_epochs": 2, "augment": "flips_rot90"}
    )
    assert plain["augment"] == "none" and augmented["augment"] == "flips_rot90"
    assert plain["best_val_loss"] != augmented["best_val_loss"]


# ----------------------------------------------------------------------------- ImageNet weights


def encoder_state(encoder: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ResNet state dict in the layout of smp's published model.safetensors (plus a classifier)."""
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in get_encoder(encoder, weights=None).state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512 if encoder == "resnet18" else 2048), torch.zeros(1000)
    return state


# smp pins each repository to a commit; the cache fetch_weights fills holds that snapshot
SMP_RESNET18_REVISION = "3f2325ff978283d47aa6a1d6878ca20565622683"


def fake_hub_cache(
    cache: Path, encoder: str, state: dict[str, torch.Tensor], commit: str = SMP_RESNET18_REVISION
) -> Path:
    """What fetch_weights leaves in hub.cache_dir for smp-hub/<encoder>.imagenet (huggingface_hub's layout)."""
    from safetensors.torch import save_file

    repo = cache / "huggingface" / "hub" / f"models--smp-hub--{encoder}.imagenet"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_imagenet_weights_load_offline_from_the_weights_cache(tmp_path):
    state = encoder_state()
    path = fake_hub_cache(tmp_path, "resnet18", state)
    spec = {**NARROW, "weights": "pretrained"}
    with hub_environment(tmp_path, offline=True):
        model = build_segmenter("supervised", spec, {}, {})
    assert "smp-hub/resnet18.imagenet@" + SMP_RESNET18_REVISION in model.identity
    loaded = model.model.encoder.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "bn1.running_mean"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())
    # the same file given as a path (``weights: <file>``)
    from_file = build_segmenter("supervised", {**NARROW, "weights": str(path)}, {}, {})
    torch.testing.assert_close(from_file.model.encoder.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    assert from_file.identity.startswith("file:model.safetensors:sha256=")


def test_missing_or_wrong_weights_name_the_file_and_the_fix(tmp_path):
    with hub_environment(tmp_path / "empty", offline=True):
        with pytest.raises(WeightsError, match="fetch_weights"):
            build_segmenter("supervised", {**NARROW, "weights": "pretrained"}, {}, {})
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(WeightsError, match=f"{missing}.*does not exist.*'pretrained'"):
        build_segmenter("supervised", {**NARROW, "weights": str(missing)}, {}, {})
    wrong = tmp_path / "resnet50.pt"
    torch.save(encoder_state("resnet50"), wrong)
    with pytest.raises(WeightsError, match=f"{wrong} does not fit.*shape mismatches"):
        build_segmenter("supervised", {**NARROW, "weights": str(wrong)}, {}, {})
    with pytest.raises(WeightsError, match="no imagenet weights for encoder 'resnext101_32x48d'"):
        build_segmenter(
            "supervised", {**NARROW, "weights": "pretrained", "options": {"encoder": "resnext101_32x48d"}}, {}, {}
        )


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_is_seeded_and_moves_labels_with_pixels():
    images = torch.rand(16, 1, 24, 24)
    labels = (images[:, 0] > 0.5).long()
    first = augment_batch(images, labels, "flips_rot90", torch.Generator().manual_seed(0))
    again = augment_batch(images, labels, "flips_rot90", torch.Generator().manual_seed(0))
    other = augment_batch(images, labels, "flips_rot90", torch.Generator().manual_seed(1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1], (first[0][:, 0] > 0.5).long()), "labels left their pixels"
    assert not torch.equal(first[0], images), "nothing was transformed"
    # every tile is one of the square's 8 symmetries of itself
    for original, moved in zip(images[:, 0], first[0][:, 0]):
        variants = [torch.rot90(v, k) for v in (original, original.flip(-1)) for k in range(4)]
        assert any(torch.equal(moved, v) for v in variants)


def test_no_augmentation_draws_nothing_and_other_shapes_are_handled():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    images, labels = torch.rand(4, 1, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long)
    assert augment_batch(images, labels, "none", generator) == (images, labels)
    assert torch.equal(generator.get_state(), state), "'none' must leave the run's random sequence alone"
    # non-square tiles (resize views) keep their shape: flips and half turns only
    wide = torch.rand(8, 1, 6, 10)
    out, moved = augment_batch(wide, (wide[:, 0] > 0.5).long(), "flips_rot90", generator)
    assert out.shape == wide.shape and torch.equal(moved, (out[:, 0] > 0.5).long())
    # a cached token grid (patch 4) moves with its pixel labels
    tokens = torch.rand(8, 3, 4, 4)
    token_labels = (tokens[:, 0] > 0.5).long().repeat_interleave(4, -2).repeat_interleave(4, -1)
    grid, grid_labels = augment_batch(tokens, token_labels, "flips_rot90", generator)
    expected = (grid[:, 0] > 0.5).long().repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert torch.equal(grid_labels, expected)
    with pytest.raises(ValueError, match="grid times one patch size"):
        augment_batch(torch.rand(2, 3, 4, 4), torch.zeros(2, 10, 10, dtype=torch.long), "flips_rot90", generator)
    with pytest.raises(ValueError, match="training.augment 'mirror'"):
        augment_batch(images, labels, "mirror", generator)


# ----------------------------------------------------------------------------- configs and tables


def test_demo_and_extended_configs_plan_the_u_nets():
    demo = validate_config(yaml.safe_load((REPO / "profiles/demo/workflow_config.yaml").read_text()))
    planned = {(run.backbone, run.regime) for run in runs(demo)}
    assert ("unet", "supervised") in planned and ("tinyvit", "supervised") not in planned
    assert "unet" not in feature_backbones(demo), "a U-Net has no features for the domain analysis"
    assert demo["training"]["augment"] == "none"
    extended = validate_config(yaml.safe_load((REPO / "profiles/extended/workflow_config.yaml").read_text()))
    unets = {name: spec for name, spec in extended["backbones"].items() if spec["family"] == "unet"}
    assert sorted(spec["weights"] for spec in unets.values()) == ["pretrained", "random"]
    assert all(spec["options"]["encoder"] == "resnet50" for spec in unets.values())
    # tiles of every view suit the U-Net: a multiple of the family's planning patch
    assert extended["tiling"]["tile_size"] % 16 == 0 and demo["tiling"]["tile_size"] % 16 == 0


def test_tables_carry_the_augment_column(tmp_path):
    from em_foundation.evaluation.metrics import Counts, scores
    from em_foundation.tables import collect_runs, summarise

    files = []
    for seed, augment in ((0, "flips_rot90"), (1, "flips_rot90")):
        record = {
            "backbone": "unet",
            "regime": "supervised",
            "train_set": "a",
            "seed": seed,
            "test_set": "a",
            "train_datasets": ["a"],
            "augment": augment,
            **scores(Counts(50 + seed, 10, 10, 930)),
            "n_images": 2,
        }
        files.append(tmp_path / f"{seed}.json")
        files[-1].write_text(json.dumps(record))
    old = {**json.loads(files[0].read_text()), "backbone": "old"}
    old.pop("augment")  # an evaluation written before the option: not augmented
    files.append(tmp_path / "old.json")
    files[-1].write_text(json.dumps(old))
    table = collect_runs(files)
    assert dict(zip(table["backbone"], table["augment"])) == {"unet": "flips_rot90", "old": "none"}
    summary = summarise(table)
    assert dict(zip(summary["backbone"], summary["augment"])) == {"unet": "flips_rot90", "old": "none"}
    assert np.isfinite(summary["fg_iou_mean"]).all()


def test_weights_imagenet_points_to_pretrained():
    """The literature's word for the U-Net's encoder weights names the project's keyword in the error."""
    from em_foundation.config import ConfigError, validate_config
    from tests.test_config import demo_config

    config = demo_config()
    config["backbones"]["unet"]["weights"] = "imagenet"
    with pytest.raises(
        ConfigError, match="backbones.unet.weights is 'imagenet'.*for ImageNet weights write 'pretrained'"
    ):
        validate_config(config)
