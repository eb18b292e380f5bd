"""Load and validate the workflow config against its schema, filling defaults.

The Snakefile and the tests use the same function, so the error a user sees for a typo
is the one the tests check.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_FILE = "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the fix."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(resources.files("em_foundation").joinpath(SCHEMA_FILE).read_text())


def _with_defaults(validator_class: type) -> type:
    """Extend a jsonschema validator so that validation also fills in defaults."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    def set_additional_defaults(validator, additional, instance, schema):
        # Named entries (datasets, backbones) get their defaults too.
        if isinstance(instance, dict) and isinstance(additional, dict):
            for key, value in instance.items():
                if key not in schema.get("properties", {}):
                    for error in validator.descend(value, additional, path=key):
                        yield error
            return
        yield from validator_class.VALIDATORS["additionalProperties"](
            validator, additional, instance, schema
        )

    return jsonschema.validators.extend(
        validator_class,
        {"properties": set_defaults, "additionalProperties": set_additional_defaults},
    )


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` in place (defaults filled) and check cross-references.

    Raises ConfigError naming the offending key; returns the config for chaining.
    """
    validator = _Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            unknown = sorted(set(error.instance) - set(allowed))
            where = _key_path(error)
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))} under {where}; "
                f"allowed keys there: {', '.join(allowed)}"
            )
        raise ConfigError(
            f"{source}: {_key_path(error)}: {error.message} (fix the value of this key)"
        )
    _check_references(config, source)
    from em_foundation.grid import expand_folds

    try:
        return expand_folds(config)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def _check_references(config: dict[str, Any], source: str) -> None:
    datasets = set(config["datasets"])
    for name, members in config["training_sets"].items():
        for member in members:
            if member not in datasets:
                raise ConfigError(
                    f"{source}: training_sets.{name} names dataset {member!r}, which is not "
                    f"under datasets (defined: {', '.join(sorted(datasets))})"
                )
    for member in config["evaluation"]["test_sets"] or []:
        if member not in datasets:
            raise ConfigError(
                f"{source}: evaluation.test_sets names dataset {member!r}, which is not under "
                f"datasets (defined: {', '.join(sorted(datasets))})"
            )
    from em_foundation.grid import parse_alignment

    for name in config["alignment"]["variants"]:
        try:
            parse_alignment(name)
        except ValueError as error:
            raise ConfigError(f"{source}: alignment.variants: {error}") from None
    for member in (config["alignment"]["train_sets"] or []):
        if member not in config["training_sets"]:
            raise ConfigError(f"{source}: alignment.train_sets names {member!r}, which is not under training_sets")
    reference = config["alignment"]["reference"]
    if reference is not None and reference not in datasets:
        raise ConfigError(f"{source}: alignment.reference {reference!r} is not under datasets")
    tile, overlap = config["tiling"]["tile_size"], config["tiling"]["overlap"]
    if config["tiling"]["mode"] == "resize":
        return
    if overlap >= tile:
        raise ConfigError(f"{source}: tiling.overlap ({overlap}) must be smaller than tiling.tile_size ({tile})")
    from em_foundation.grid import patch_size_of

    for name, backbone in config["backbones"].items():
        patch = patch_size_of(backbone)
        if tile % patch:
            raise ConfigError(
                f"{source}: tiling.tile_size {tile} is not a multiple of the patch size {patch} "
                f"of backbone {name!r}; use a common multiple (448 suits patch 14 and 16)"
            )


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return validate_config(config or {}, source=str(path))
