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


def test_yaml_1_1_exponent_without_a_dot_is_read_as_the_number():
    config = yaml.safe_load((REPO / "profiles/demo/workflow_config.yaml").read_text().replace("lr: 1.0e-3", "lr: 1e-3"))
    assert config["training"]["lr"] == "1e-3"  # what YAML 1.1 gives
    assert validate_config(config)["training"]["lr"] == 1e-3


def test_a_config_with_no_runs_is_refused_listing_each_familys_regimes():
    config = demo_config()
    del config["backbones"]["tinyvit"]
    config["regimes"] = ["lora"]
    with pytest.raises(ConfigError) as raised:
        validate_config(config, warn=lambda message: None)
    print(raised.value)
    assert "give no runs" in str(raised.value) and "filterbank: head, forest, pixelforest" in str(raised.value)


def test_a_regime_a_family_drops_is_warned_about():
    warnings = []
    # regimes head, lora, supervised; filterbank has no lora (supervised is the U-Net's alone: not warned about)
    validate_config(demo_config(), warn=warnings.append)
    print(warnings)
    assert len(warnings) == 1 and "'filterbank'" in warnings[0] and "lora" in warnings[0]


def test_weights_typo_is_named_at_start_up():
    config = demo_config()
    config["backbones"]["tinyvit"]["weights"] = "randon"
    with pytest.raises(
        ConfigError, match=r"backbones\.tinyvit\.weights is 'randon': not 'pretrained', 'random', or an existing"
    ):
        validate_config(config)


def test_corrupt_weights_file_is_not_a_checkpoint_file(tmp_path):
    bad = tmp_path / "dino.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    config = demo_config()
    config["backbones"]["tinyvit"]["weights"] = str(bad)
    with pytest.raises(ConfigError, match=r"backbones\.tinyvit\.weights: .*dino\.pt is not a checkpoint file"):
        validate_config(config)


def test_corrupt_weights_file_read_at_run_time_says_not_a_checkpoint_file(tmp_path):
    from em_foundation.backbones.checkpoint import WeightsError, load_state_dict_file

    bad = tmp_path / "dino.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    with pytest.raises(WeightsError) as raised:
        load_state_dict_file(bad)
    print(raised.value)
    assert "is not a checkpoint file" in str(raised.value) and "weights_only" not in str(raised.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "n_trian",
            8,
            r"datasets\.fibsem\.options\.n_trian: unknown option of converter 'synthetic'; its options: domain, height",
        ),
        ("n_train", "eight", r"datasets\.fibsem\.options\.n_train is 'eight', which is not an integer \(default 12\)"),
    ],
)
def test_converter_options_are_checked_at_start_up_with_the_key_path(key, value, message):
    config = demo_config()
    config["datasets"]["fibsem"]["options"][key] = value
    with pytest.raises(ConfigError, match=message) as raised:
        validate_config(config)
    assert "{" not in str(raised.value), "the message dumps a whole dict"


def test_unknown_converter_is_named_with_the_registered_ones():
    config = demo_config()
    config["datasets"]["fibsem"]["converter"] = "synthetc"
    with pytest.raises(
        ConfigError,
        match=r"datasets\.fibsem\.converter: unknown converter 'synthetc'; registered: folder, kasthuri_pp, lucchi_pp, synthetic, vnc, volume",
    ):
        validate_config(config)


def test_empty_test_sets_are_refused_not_read_as_all():
    config = demo_config()
    config["evaluation"]["test_sets"] = []
    with pytest.raises(ConfigError, match="evaluation.test_sets is an empty list.*write null to score every dataset"):
        validate_config(config)


def test_tile_larger_than_the_slices_is_refused():
    config = demo_config()
    config["tiling"] = {"tile_size": 448, "overlap": 16}
    with pytest.raises(
        ConfigError,
        match=r"tiling.tile_size 448 is larger than the 256×256 slices of dataset 'fibsem'.*3.1× the pixels",
    ):
        validate_config(config)


def test_command_line_values_are_coerced_and_errors_blame_the_command_line():
    config = demo_config()
    command_line = {"seeds": ["0"], "training": {"max_epochs": "3", "lr": "1e-4"}}
    config["seeds"], config["training"]["max_epochs"], config["training"]["lr"] = ["0"], "3", "1e-4"
    validate_config(config, source="profiles/demo/workflow_config.yaml", command_line=command_line)
    assert config["seeds"] == [0] and config["training"]["max_epochs"] == 3 and config["training"]["lr"] == 1e-4
    config = demo_config()
    config["training"]["batch_size"] = "big"
    with pytest.raises(ConfigError) as raised:
        validate_config(
            config, source="profiles/demo/workflow_config.yaml", command_line={"training": {"batch_size": "big"}}
        )
    assert str(raised.value) == (
        "the command line (--config): training.batch_size is 'big', which is not of type integer (fix the value of this key)"
    )


@pytest.mark.parametrize(
    "backbone, key, value, message",
    [
        (
            "tinyvit",
            "init_sed",
            7,
            r"backbones\.tinyvit\.options\.init_sed: unknown option of family 'dinov2'; its options: init_seed",
        ),
        (
            "filterbank",
            "patch_size",
            "eight",
            r"backbones\.filterbank\.options\.patch_size is 'eight', which is not an integer",
        ),
    ],
)
def test_backbone_options_are_checked_at_start_up_with_the_key_path(backbone, key, value, message):
    config = demo_config()
    config["backbones"][backbone]["options"] = {**config["backbones"][backbone].get("options", {}), key: value}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_checks_after_the_schema_blame_the_command_line_for_its_values():
    """A --config value failing a check after the schema (converter options, the grid ...) is named
    as the command line's, not the preset file's, which does not have that key."""
    preset = "profiles/demo/workflow_config.yaml"
    config = demo_config()
    config["datasets"]["fibsem"]["options"]["n_trian"] = 3
    command_line = {"datasets": {"fibsem": {"options": {"n_trian": 3}}}}
    with pytest.raises(ConfigError) as raised:
        validate_config(config, source=preset, command_line=command_line)
    message = str(raised.value)
    assert message.startswith("the command line (--config): datasets.fibsem.options.n_trian"), message
    assert preset not in message
    config = demo_config()  # the same typo in the file itself is the file's
    config["datasets"]["fibsem"]["options"]["n_trian"] = 3
    with pytest.raises(ConfigError, match=rf"^{preset}: datasets.fibsem.options.n_trian"):
        validate_config(config, source=preset, command_line={"seeds": [0]})


def test_an_unknown_figure_style_stops_at_start_up():
    config = demo_config()
    config["figures"] = {"style": "nonexistent"}
    with pytest.raises(
        ConfigError, match=r"figures.style 'nonexistent': no file nonexistent.mplstyle.*styles there: paper"
    ):
        validate_config(config, source="c.yaml", command_line={"figures": {"style": "nonexistent"}})
