"""Config validation: defaults, unknown keys and wrong types named, cross-references checked."""

import copy
from pathlib import Path

import pytest
import yaml

from em_foundation.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def demo_config():
    return yaml.safe_load((REPO / "profiles/demo/workflow_config.yaml").read_text())


def test_published_and_demo_configs_are_valid_and_get_defaults():
    published = load_config(REPO / "config.yaml")
    assert published["training"]["lr"] == 5.0e-5 and published["training"]["patience"] == 20
    assert published["seeds"] == [0, 1, 2, 3, 4]
    assert published["backbones"]["dinov2L"]["layers"] == [-1]
    demo = validate_config(demo_config())
    assert demo["hub"]["cache_dir"] == "resources/weights"


def test_unknown_key_names_the_key():
    config = demo_config()
    config["training"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="'learning_rate'.*training"):
        validate_config(config)


def test_unknown_top_level_key_names_the_key():
    config = demo_config()
    config["sedes"] = [1]
    with pytest.raises(ConfigError, match="'sedes'"):
        validate_config(config)


def test_wrong_type_names_the_key():
    config = demo_config()
    config["training"]["batch_size"] = "two"
    with pytest.raises(ConfigError, match=r"training\.batch_size"):
        validate_config(config)


def test_training_set_must_name_defined_datasets():
    config = demo_config()
    config["training_sets"]["paired"] = ["fibsem", "lucchi"]
    with pytest.raises(ConfigError, match="'lucchi'"):
        validate_config(config)


def test_tile_size_must_fit_every_patch_size():
    config = demo_config()
    config["tiling"]["tile_size"] = 230
    with pytest.raises(ConfigError, match="not a multiple of the patch size"):
        validate_config(copy.deepcopy(config))
