"""Parameter table for the real Large architectures, from random weights, without any download."""

from __future__ import annotations

import runpy
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from em_foundation.backbones.hub import hub_environment
from em_foundation.backbones.parameters import COLUMNS, parameter_table
from em_foundation.config import load_config
from em_foundation.heads.deconv import DeconvHead

REPO = Path(__file__).resolve().parents[1]
ALL_REGIMES = ["head", "lora", "fullft", "forest", "pixelforest"]
LORA_L = 2_359_296  # 24 blocks x rank 16 x (1024 + 3072 + 1024 + 1024)

LARGE = {
    "dinov2L": {"family": "dinov2", "model": "vit_large_patch14_dinov2.lvd142m"},
    "dinov3L": {"family": "dinov3", "model": "vit_large_patch16_dinov3.lvd1689m"},
    "openclipL": {
        "family": "openclip",
        "model": "ViT-L-14",
        "options": {"pretrained_tag": "laion2b_s32b_b82k"},
        "pooling": "cls",
    },
}


def large_config() -> dict:
    return {
        "backbones": {name: dict(spec, weights="pretrained") for name, spec in LARGE.items()},
        "regimes": ALL_REGIMES,
        "head": {"width": 512},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
    }


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    # An empty, offline cache: any attempt to read or download weights would fail.
    with hub_environment(tmp_path_factory.mktemp("empty_cache"), offline=True):
        return parameter_table(large_config())


def test_table_covers_every_backbone_and_regime(table):
    assert list(table.columns) == COLUMNS
    assert len(table) == len(LARGE) * len(ALL_REGIMES)
    assert set(zip(table.backbone, table.regime)) == {(b, r) for b in LARGE for r in ALL_REGIMES}


def test_regime_rules(table):
    head = sum(p.numel() for p in DeconvHead(1024, 512).parameters())
    for backbone, rows in table.groupby("backbone"):
        rows = rows.set_index("regime")
        encoder = rows.loc["head", "backbone_params"]
        # ViT-L: about 303-304 million parameters in every family (text tower and CLIP projection excluded).
        assert 3.0e8 < encoder < 3.1e8, backbone
        assert (rows.embed_dim == 1024).all()
        assert rows.loc["head", "trainable_params"] == head == rows.loc["head", "head_params"]
        assert rows.loc["head", "total_params"] == encoder + head
        assert rows.loc["lora", "adapter_params"] == LORA_L
        assert rows.loc["lora", "trainable_params"] == LORA_L + head
        assert rows.loc["lora", "total_params"] == encoder + LORA_L + head
        assert rows.loc["fullft", "trainable_params"] == rows.loc["fullft", "total_params"] == encoder + head
        assert rows.loc["forest", "trainable_params"] == 0 and rows.loc["forest", "head_params"] == 0
        assert rows.loc["pixelforest", "trainable_params"] == 0 and rows.loc["pixelforest", "head_params"] == 0
    patch = table.groupby("backbone").patch_size.first().to_dict()
    assert patch == {"dinov2L": 14, "dinov3L": 16, "openclipL": 14}


def test_dinov2_large_matches_timm(table):
    import timm

    with torch.device("meta"):
        model = timm.create_model(
            "vit_large_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, dynamic_img_size=True
        )
    expected = sum(p.numel() for p in model.parameters())
    assert (table[table.backbone == "dinov2L"].backbone_params == expected).all()


def test_default_config_regimes_only(tmp_path):
    """Only the config's regimes, and only those the family has (filterbank: head, forest)."""
    pytest.importorskip("em_foundation.backbones.filterbank")
    config = load_config(REPO / "config.yaml")
    config["backbones"] = {"fb": {"family": "filterbank"}, "dinov2L": dict(LARGE["dinov2L"], weights="pretrained")}
    config["regimes"] = ["head", "lora"]
    with hub_environment(tmp_path, offline=True):
        frame = parameter_table(config)
    assert list(zip(frame.backbone, frame.regime)) == [("fb", "head"), ("dinov2L", "head"), ("dinov2L", "lora")]
    assert frame.set_index("backbone").loc["fb", "backbone_params"] == 0


def test_parameters_script_writes_the_csv(tmp_path):
    output = tmp_path / "results" / "tables" / "parameters.csv"
    config = large_config()
    snakemake = types.SimpleNamespace(
        params=types.SimpleNamespace(
            backbones=config["backbones"], regimes=config["regimes"], head=config["head"], lora=config["lora"]
        ),
        output=[str(output)],
        log=[str(tmp_path / "logs" / "parameters.log")],
    )
    with hub_environment(tmp_path / "cache", offline=True):
        runpy.run_path(str(REPO / "scripts" / "parameters.py"), init_globals={"snakemake": snakemake})
    frame = pd.read_csv(output)
    assert len(frame) == len(LARGE) * len(ALL_REGIMES) and list(frame.columns) == COLUMNS
    lora = frame[(frame.backbone == "dinov2L") & (frame.regime == "lora")]
    assert int(lora.adapter_params.iloc[0]) == LORA_L
    assert [p.name for p in output.parent.iterdir()] == ["parameters.csv"]  # no temporary left
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
