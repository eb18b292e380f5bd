"""Per-regime training overrides: validated, applied to one regime's runs only, recorded."""

from __future__ import annotations

import copy

import pytest
import yaml

from em_foundation.config import ConfigError, load_schema, validate_config
from em_foundation.regimes import REGIMES
from em_foundation.training.recipe import recipe_of, recipe_text, training_for
from tests.workflow import REPO, demo_config


def _with_overrides(overrides: dict) -> dict:
    config = demo_config()
    config["training"]["overrides"] = overrides
    return config


def test_an_override_reaches_only_its_regime():
    config = validate_config(_with_overrides({"supervised": {"lr": 1e-3, "augment": "flips_rot90", "batch_size": 8}}))
    shared = {k: v for k, v in config["training"].items() if k != "overrides"}
    supervised = training_for(config["training"], "supervised")
    assert supervised["lr"] == 1e-3 and supervised["augment"] == "flips_rot90" and supervised["batch_size"] == 8
    assert supervised["overridden"] == ["augment", "batch_size", "lr"]
    for regime in ("head", "lora", "fullft"):
        # key for key the block without overrides: these regimes' params (and so their runs) do not change
        assert training_for(config["training"], regime) == shared
    assert recipe_of(supervised)["lr"] == 1e-3 and "lr=0.001" in recipe_text(recipe_of(supervised))


def test_published_setup_has_no_overrides_and_keeps_the_vit_recipe():
    config = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    assert config["training"]["overrides"] == {}
    head = training_for(config["training"], "head")
    assert (head["lr"], head["batch_size"], head["augment"]) == (5.0e-5, 2, "none") and "overridden" not in head


def test_every_gradient_regime_and_only_those_can_be_overridden():
    schema = load_schema()["properties"]["training"]["properties"]["overrides"]["properties"]
    assert set(schema) == {name for name, regime in REGIMES.items() if "training" in regime.blocks}


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"unet": {"lr": 1e-3}}, "'unet' under training.overrides"),
        ({"forest": {"lr": 1e-3}}, "'forest' under training.overrides"),
        ({"supervised": {"learning_rate": 1e-3}}, "'learning_rate' under training.overrides.supervised"),
        ({"supervised": {"lr": -1.0}}, "training.overrides.supervised.lr"),
        ({"supervised": {"augment": "elastic"}}, "training.overrides.supervised.augment"),
        ({"supervised": {"batch_size": 0}}, "training.overrides.supervised.batch_size"),
    ],
)
def test_a_bad_override_is_refused_naming_the_key(overrides, named):
    with pytest.raises(ConfigError) as error:
        validate_config(_with_overrides(copy.deepcopy(overrides)))
    assert named in str(error.value), str(error.value)


def test_extended_config_gives_the_unets_their_own_recipe_and_the_vits_the_published_one():
    config = validate_config(yaml.safe_load((REPO / "profiles/extended/workflow_config.yaml").read_text()))
    unet, head = training_for(config["training"], "supervised"), training_for(config["training"], "head")
    assert unet["augment"] == "flips_rot90" and unet["lr"] > head["lr"] == 5.0e-5
    assert head["augment"] == "none" and head["batch_size"] == 2
