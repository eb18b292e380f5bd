"""config.yaml is the published setup of ../shared/docs/experiment.md, value for value.

A silent drift of any value in the published table (a default changed in the schema, a
key edited in config.yaml, a code constant such as the LoRA targets or the head's channels)
fails here. The extended study lives in profiles/extended/workflow_config.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from em_foundation.config import load_config
from em_foundation.data.tiles import resize_images, resized_shape
from em_foundation.grid import FAMILY_REGIMES, patch_size_of, runs, view_of
from em_foundation.heads.deconv import DeconvHead, up_blocks_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def published():
    return load_config(REPO / "config.yaml")


def test_datasets_and_split(published):
    assert set(published["datasets"]) == {"lucchi", "vnc"}
    assert published["datasets"]["lucchi"]["converter"] == "lucchi_pp"
    assert published["datasets"]["lucchi"]["url"] == "http://www.casser.io/files/lucchi_pp.zip"
    vnc = published["datasets"]["vnc"]
    assert vnc["converter"] == "vnc"
    assert vnc["url"].startswith("https://github.com/unidesigner/groundtruth-drosophila-vnc/")
    # 20 labelled slices, 17 train / 3 test by a seeded shuffle
    assert vnc["options"].get("split", "shuffle") == "shuffle"
    assert vnc["options"]["n_test"] == 3 and vnc["options"]["split_seed"] == 0
    assert published["training_sets"] == {"lucchi": ["lucchi"], "vnc": ["vnc"], "paired": ["lucchi", "vnc"]}
    assert published["evaluation"]["test_sets"] is None  # every dataset's test split


def test_backbones_tags_and_normalisation(published):
    backbones = published["backbones"]
    assert {name: (b["family"], b["model"]) for name, b in backbones.items()} == {
        "dinov2L": ("dinov2", "vit_large_patch14_dinov2.lvd142m"),
        "dinov3L": ("dinov3", "vit_large_patch16_dinov3.lvd1689m"),
        "openclipL": ("openclip", "ViT-L-14"),
    }
    assert backbones["openclipL"]["options"]["pretrained_tag"] == "laion2b_s32b_b82k"
    for backbone in backbones.values():
        assert backbone["weights"] == "pretrained"
        assert backbone["layers"] == [-1]  # last-block patch tokens
        assert backbone["normalisation"] == "family"  # each family's own constants; imagenet is the option
    # one embedding per image: mean of patch tokens, CLS for OpenCLIP
    assert [b["pooling"] for b in backbones.values()] == ["mean", "mean", "cls"]
    assert [patch_size_of(b) for b in backbones.values()] == [14, 16, 14]


def test_input_mode_and_sizes(published):
    tiling = published["tiling"]
    assert tiling["mode"] == "resize" and tiling["longest_edge"] == 1022
    assert {view_of(published, b) for b in published["backbones"]} == {"resize1022p14", "resize1008p16"}
    # Lucchi++ 768×1024 and VNC 1024×1024, sides floored to the patch
    assert resized_shape(768, 1024, 1022, 14) == (756, 1022)
    assert resized_shape(768, 1024, 1008, 16) == (752, 1008)
    assert resized_shape(1024, 1024, 1022, 14) == (1022, 1022)
    assert resized_shape(1024, 1024, 1008, 16) == (1008, 1008)


def test_resize_is_bicubic_for_images_and_nearest_for_masks():
    image = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8).numpy() * 4
    mask = (image > 100).astype("uint8")
    resized = resize_images(image, (5, 5), "bicubic")
    expected = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image).float()[None], size=(5, 5), mode="bicubic", align_corners=False
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)[0]
        .numpy()
    )
    assert (resized == expected).all()
    assert set(resize_images(mask, (5, 5), "nearest").ravel()) <= {0, 1}, "masks keep their labels"


def test_head_widths(published):
    assert published["head"]["width"] == 512
    head = DeconvHead(8, published["head"]["width"], up_blocks=up_blocks_for(14))
    assert head.stem[0].out_channels == 512
    assert [block[0].out_channels for block in head.up] == [256, 128, 64, 64]
    assert [(b[0].kernel_size, b[0].stride, b[0].padding) for b in head.up] == [((4, 4), (2, 2), (1, 1))] * 4
    assert head.classifier.out_channels == 2
    assert up_blocks_for(14) == up_blocks_for(16) == 4  # ×16 upsampling


def test_regimes_and_lora(published):
    assert published["regimes"] == ["head", "lora"]
    assert published["lora"] == {"rank": 16, "alpha": 32, "dropout": 0.0}
    from em_foundation.families import FAMILIES

    # every block's attention qkv and output proj, MLPs untouched
    for targets in (FAMILIES[name].lora_targets for name in ("dinov2", "dinov3", "openclip")):
        assert re.fullmatch(
            targets, "blocks.3.attn.qkv" if "resblocks" not in targets else "transformer.resblocks.3.attn.qkv"
        )
        assert not re.fullmatch(targets, "blocks.3.mlp.fc1") and not re.fullmatch(
            targets, "transformer.resblocks.3.mlp.c_fc"
        )
    assert FAMILY_REGIMES["dinov2"][:3] == ("head", "lora", "fullft")  # full fine-tuning as the third regime


def test_training(published):
    assert published["training"] == {
        "lr": 5.0e-5,
        "weight_decay": 1.0e-4,
        "batch_size": 2,
        "max_epochs": 1000,
        "patience": 20,
        # no minimum of optimiser steps, patience in epochs: the published stopping rule
        "min_steps": 0,
        "patience_steps": None,
        "grad_clip": 1.0,
        "val_fraction": 0.1,
        "balanced_sampling": False,
        # every training slice: the label-efficiency sweep is off in the published setup
        "n_train_slices": ["all"],
        "n_train_slices_for": None,
        "augment": "none",  # no flips or rotations: the published training batches as they are
        "overrides": {},  # one recipe for every regime: no per-regime training.overrides
        **{k: v for k, v in published["training"].items() if k in ("val_loss", "val_split", "val_gap")},
    }
    assert published["training"].get("val_loss", "pooled") == "pooled"
    from em_foundation.data.splits import validation_mode

    # auto follows the test split: the published one is a shuffle (VNC) or a separate volume (Lucchi++)
    for entry in published["datasets"].values():
        mode = validation_mode(
            published["training"]["val_split"], published["training"]["val_gap"], entry.get("options")
        )
        assert mode[:2] == ("shuffle", 0)
    source = (REPO / "em_foundation/training/trainer.py").read_text()
    assert "torch.optim.AdamW(" in source and "soft_dice_loss(" in source and "clip_grad_norm_(" in source


def test_repeats_and_grid(published):
    assert published["seeds"] == [0, 1, 2, 3, 4]
    grid = runs(published)
    assert {run.alignment for run in grid} == {"none"}, "the study had no domain alignment"
    assert len(grid) == 3 * 2 * 3 * 5


def test_domain_analysis(published):
    analysis = published["analysis"]
    assert analysis["views"] == ["pooled"]  # one embedding per image
    assert analysis["pca_dim"] == 64  # the probe on PCA-64 features
    assert analysis["percentile"] == 97  # Mahalanobis OOD threshold
    assert analysis["umap"] is True
    assert analysis["balance_pca"] is False


def test_extended_preset_adds_only_the_study_beyond():
    published = load_config(REPO / "config.yaml")
    extended = load_config(REPO / "profiles/extended/workflow_config.yaml")
    assert extended["tiling"]["mode"] == "tile"
    assert set(extended["regimes"]) == {"head", "lora", "fullft", "forest", "pixelforest", "supervised"}
    assert "filterbank" in extended["backbones"] and len(extended["alignment"]["variants"]) > 1
    same = ("seeds", "head", "lora", "training")
    # the label-efficiency sweep is added with an optimisation budget in steps, the rest kept
    # and the U-Nets' own recipe (training.overrides.supervised), the ViTs' values kept
    sweep = ("n_train_slices", "n_train_slices_for", "min_steps", "patience_steps", "overrides")
    for key in same:
        strip = (
            (lambda block: {k: v for k, v in block.items() if k not in sweep}) if key == "training" else (lambda b: b)
        )
        assert strip(extended[key]) == strip(published[key]), key
    assert extended["training"]["n_train_slices"] == [1, 2, 4, 8, "all"]
    assert set(extended["training"]["overrides"]) == {"supervised"}, "only the U-Nets train under their own recipe"
    assert extended["training"]["n_train_slices_for"] == ["lucchi", "vnc", "kasthuri"]
    # 20 epochs of the full Lucchi++ run (444 steps each) as patience, at every label budget
    assert (extended["training"]["min_steps"], extended["training"]["patience_steps"]) == (4440, 8880)
    beyond = ("filterbank", "samB", "usamB", "sam2Bplus", "unetR50", "unetR50IN")
    assert {k: v for k, v in extended["backbones"].items() if k not in beyond} == published["backbones"]
    # General versus EM-pretrained: one architecture, SAM's weights against micro-sam's EM fine-tuning.
    sam, usam = extended["backbones"]["samB"], extended["backbones"]["usamB"]
    assert sam["family"] == usam["family"] == "sam"
    assert sam["model"].split(".")[0] == usam["model"] == "samvit_base_patch16"
    assert usam["options"]["micro_sam"] == "vit_b_em_organelles" and "micro_sam" not in sam["options"]
    assert extended["backbones"]["sam2Bplus"]["family"] == "sam2"
    assert extended["backbones"]["sam2Bplus"]["model"] == "sam2_hiera_base_plus.fb_r896"
    # both at SAM's own input (resized to 1024 and padded): the pair is compared where it was trained
    assert sam["options"]["input"] == usam["options"]["input"] == "sam"
    # Kasthuri++ joins as a third domain; the two published datasets are unchanged.
    assert {k: v for k, v in extended["datasets"].items() if k != "kasthuri"} == published["datasets"]
    assert extended["datasets"]["kasthuri"]["converter"] == "kasthuri_pp"
    assert {k: v for k, v in extended["training_sets"].items() if k != "kasthuri"} == published["training_sets"]


def test_label_efficiency_sweep_is_a_run_dimension_that_keeps_todays_paths(published):
    import copy

    from em_foundation.grid import n_train_slices_of

    default = runs(published)
    assert {run.n_train_slices for run in default} == {"all"}
    assert all(run.path.endswith(f"/seed{run.seed}") for run in default), "the default changed the run paths"
    swept = copy.deepcopy(published)
    swept["training"]["n_train_slices"] = [2, "all"]
    swept["training"]["n_train_slices_for"] = ["lucchi", "vnc"]
    grown = runs(swept)
    assert {run.path for run in default} <= {run.path for run in grown}, "a sweep must keep the 'all' runs' paths"
    extra = [run for run in grown if run.n_train_slices == "2"]
    assert {run.train_set for run in extra} == {"lucchi", "vnc"} and len(extra) == 2 * len(default) // 3
    assert all(run.path.endswith(f"/seed{run.seed}-n2") for run in extra)
    assert n_train_slices_of("-n2") == "2" and n_train_slices_of("") == "all"
