"""Load and validate the workflow config against its schema, filling defaults.

The Snakefile and the tests use the same function, so the error a user sees for a typo
is the one the tests check.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

SCHEMA_FILE = "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the fix."""


def load_schema() -> dict[str, Any]:
    """The schema file, with the family and regime names filled in from their tables."""
    from em_foundation.families import FAMILIES
    from em_foundation.regimes import REGIMES

    schema = yaml.safe_load(resources.files("em_foundation").joinpath(SCHEMA_FILE).read_text())
    properties = schema["properties"]
    properties["backbones"]["additionalProperties"]["properties"]["family"]["enum"] = list(FAMILIES)
    properties["regimes"]["items"]["enum"] = list(REGIMES)
    return schema


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
        yield from validator_class.VALIDATORS["additionalProperties"](validator, additional, instance, schema)

    return jsonschema.validators.extend(
        validator_class,
        {"properties": set_defaults, "additionalProperties": set_additional_defaults},
    )


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NOT_CONVERTED = object()


def _from_text(text: str, types: list[str]) -> Any:
    """The one reading of ``text`` that the schema's types allow, or _NOT_CONVERTED.

    YAML 1.1 reads ``1e-3`` as a string, and ``--config`` values inside lists and mappings
    arrive as strings (``seeds=[0]`` gives ``['0']``): both mean a number, unambiguously.
    """
    stripped = text.strip()
    if "null" in types and stripped in ("null", "None", "~"):
        return None
    if "integer" in types and _INTEGER.fullmatch(stripped):
        return int(stripped)
    if "number" in types and _NUMBER.fullmatch(stripped):
        value = float(stripped)
        return int(value) if "integer" in types and value.is_integer() else value
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return _NOT_CONVERTED


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)


def coerce_to_schema(value: Any, schema: Any) -> Any:
    """``value`` with text converted to the schema's types where that reading is unambiguous;
    anything else is left for validation to report with the key, the value and the type."""
    if not isinstance(schema, dict):
        return value
    types = _types(schema)
    if isinstance(value, str) and types and "string" not in types:
        converted = _from_text(value, types)
        if converted is not _NOT_CONVERTED:
            return converted
    if "array" in types and value is not None and not isinstance(value, (list, dict)):
        # One value where a list is expected (seeds=0): a list of that one value.
        return [coerce_to_schema(value, schema.get("items", {}))]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            key: coerce_to_schema(item, properties.get(key, extra if isinstance(extra, dict) else {}))
            for key, item in value.items()
        }
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce_to_schema(item, schema["items"]) for item in value]
    return value


def _given_on_command_line(path: list[Any], command_line: dict[str, Any] | None) -> bool:
    node: Any = command_line
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return bool(path)


def _warn_to_stderr(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr)


def validate_config(
    config: dict[str, Any],
    source: str = "config",
    command_line: dict[str, Any] | None = None,
    layering_hint: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Validate ``config`` in place (text coerced to the schema's types, defaults filled) and
    check what the schema cannot: cross-references, weights, converter options, the grid.

    ``command_line`` holds the values given with ``--config``: an error in one of them names
    the command line instead of ``source``. ``layering_hint`` is added when required blocks
    are missing (a --configfile replaces the preset whole). Warnings go to ``warn``.
    Raises ConfigError naming the offending key; returns the config for chaining.
    """
    warn = warn or _warn_to_stderr
    schema = load_schema()
    config.update(coerce_to_schema(config, schema))
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        where = source
        if _given_on_command_line(list(error.absolute_path), command_line):
            where = "the command line (--config)"
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            unknown = sorted(set(error.instance) - set(allowed))
            if _given_on_command_line([*error.absolute_path, unknown[0]], command_line):
                where = "the command line (--config)"
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))} under {_key_path(error)}; "
                f"allowed keys there: {', '.join(allowed)}"
            )
        if error.validator == "required" and not error.absolute_path:
            missing = [key for key in error.validator_value if key not in config]
            raise ConfigError(
                f"{where}: the required block(s) {', '.join(missing)} are missing. "
                + (layering_hint or "A config must define datasets, training_sets and backbones.")
            )
        if error.validator == "type":
            expected = " or ".join(_types(error.schema))
            raise ConfigError(
                f"{where}: {_key_path(error)} is {error.instance!r}, which is not of type {expected} (fix the value of this key)"
            )
        raise ConfigError(f"{where}: {_key_path(error)}: {error.message} (fix the value of this key)")
    try:
        _check_after_schema(config, source, warn)
    except ConfigError as error:
        raise _blamed_on_command_line(error, source, command_line) from None
    return config


def _check_after_schema(config: dict[str, Any], source: str, warn: Callable[[str], None]) -> None:
    # Free-form blocks first: the checks after them read their values.
    _check_converters(config, source)
    _check_backbone_options(config, source)
    _check_references(config, source)
    _check_resampling(config, source)
    _check_figures(config, source)
    from em_foundation.grid import expand_folds

    try:
        expand_folds(config)  # in place: a k-fold dataset becomes one dataset per fold
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    _check_grid(config, source, warn)
    _check_weights(config, source)
    _check_predict(config, source)


# the key a check's message names first, right after its source: "datasets.fibsem.options.n_trian: ..."
_NAMED_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[\w-]+)*")


def _blamed_on_command_line(error: ConfigError, source: str, command_line: dict[str, Any] | None) -> ConfigError:
    """The checks after the schema name ``source``; where the key they name first was given with
    --config, the command line is to blame instead (as the schema errors already say)."""
    message = str(error)
    prefix = f"{source}: "
    if not command_line or not message.startswith(prefix):
        return error
    rest = message[len(prefix) :]
    key = _NAMED_KEY.match(rest)
    if key and _given_on_command_line(key.group(0).split("."), command_line):
        return ConfigError(f"the command line (--config): {rest}")
    return error


def _check_figures(config: dict[str, Any], source: str) -> None:
    """An unknown figure style stops the run at start-up, not when the first figure is drawn."""
    style = config["figures"]["style"]
    styles = resources.files("em_foundation.figures")
    if not styles.joinpath(f"{style}.mplstyle").is_file():
        known = sorted(
            entry.name.removesuffix(".mplstyle") for entry in styles.iterdir() if entry.name.endswith(".mplstyle")
        )
        raise ConfigError(
            f"{source}: figures.style {style!r}: no file {style}.mplstyle in em_foundation/figures/; "
            f"styles there: {', '.join(known)} (or add your own .mplstyle file there)"
        )


def _check_predict(config: dict[str, Any], source: str) -> None:
    """A wrong model named in ``predict`` stops the run at start-up, not after training."""
    if not config["predict"]["images"]:
        return
    from em_foundation.grid import predict_run

    try:
        predict_run(config)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def _check_grid(config: dict[str, Any], source: str, warn: Callable[[str], None]) -> None:
    """A regime a family cannot run is dropped with a warning; a config with no runs at all is refused."""
    from em_foundation.grid import FAMILIES, FAMILY_REGIMES, runs

    def offered(regime: str, segmenter: bool) -> bool:
        # 'supervised' means nothing to a token backbone, nor head or lora to a U-Net: no warning for those
        return any(regime in family.regimes for family in FAMILIES.values() if family.segmenter == segmenter)

    for name, backbone in config["backbones"].items():
        family = backbone["family"]
        kind = FAMILIES[family].segmenter
        dropped = [r for r in config["regimes"] if r not in FAMILY_REGIMES[family] and offered(r, kind)]
        if dropped:
            warn(
                f"{source}: regimes lists {', '.join(dropped)}, which backbone {name!r} (family {family}) cannot run: "
                f"it runs {', '.join(r for r in config['regimes'] if r in FAMILY_REGIMES[family]) or 'nothing'} only"
            )
    if not runs(config):
        families = sorted({backbone["family"] for backbone in config["backbones"].values()})
        supported = "; ".join(f"{family}: {', '.join(FAMILY_REGIMES[family])}" for family in families)
        raise ConfigError(
            f"{source}: regimes {config['regimes']} give no runs for backbones "
            f"{', '.join(config['backbones'])}. Regimes each family runs: {supported}"
        )


def _check_weights(config: dict[str, Any], source: str) -> None:
    """``weights`` is a keyword or a file; a typo ('randon') is not taken for a missing file."""
    import zipfile

    for name, backbone in config["backbones"].items():
        weights = backbone["weights"]
        if backbone["family"] == "filterbank" or weights in ("pretrained", "random"):
            continue
        path = Path(weights)
        key = f"backbones.{name}.weights"
        if not path.is_file():
            raise ConfigError(
                f"{source}: {key} is {weights!r}: not 'pretrained', 'random', or an existing checkpoint file "
                f"(no file {path.resolve()})"
                + (
                    "; for ImageNet weights write 'pretrained' (every family's hub weights: the U-Net's ImageNet encoder)"
                    if weights.lower() == "imagenet"
                    else ""
                )
            )
        # torch.save writes a zip archive; safetensors starts with its header length and a JSON header.
        with open(path, "rb") as handle:
            head = handle.read(9)
        is_safetensors = path.suffix == ".safetensors" and len(head) == 9 and head[8:9] == b"{"
        if not (zipfile.is_zipfile(path) or is_safetensors):
            raise ConfigError(
                f"{source}: {key}: {path} is not a checkpoint file (neither a torch.save archive nor "
                ".safetensors); point it at the model's weights or use 'pretrained' or 'random'"
            )


def _check_backbone_options(config: dict[str, Any], source: str) -> None:
    """``backbones.<name>.options`` against the keys its family reads."""
    from em_foundation.grid import FAMILY_OPTIONS

    for name, backbone in config["backbones"].items():
        declared = FAMILY_OPTIONS[backbone["family"]]
        for key, value in backbone["options"].items():
            where = f"backbones.{name}.options.{key}"
            if key not in declared:
                raise ConfigError(
                    f"{source}: {where}: unknown option of family {backbone['family']!r}; "
                    f"its options: {', '.join(sorted(declared))}"
                )
            kind = declared[key]
            if kind in (int, float) and isinstance(value, str):
                value = _from_text(value, ["integer" if kind is int else "number"])
            if value is _NOT_CONVERTED or not (isinstance(value, kind) and not isinstance(value, bool)):
                raise ConfigError(
                    f"{source}: {where} is {backbone['options'][key]!r}, which is not {_KIND_NAMES.get(kind, 'a list')}"
                )
            backbone["options"][key] = value


def _check_converters(config: dict[str, Any], source: str) -> None:
    """Converter names and their free-form ``options`` against the converter registry."""
    from em_foundation.data.registry import CONVERTER_OPTIONS, CONVERTER_REQUIRED, CONVERTERS, load_converters

    load_converters()
    for name, dataset in config["datasets"].items():
        converter = dataset["converter"]
        if converter not in CONVERTERS:
            raise ConfigError(
                f"{source}: datasets.{name}.converter: unknown converter {converter!r}; "
                f"registered: {', '.join(CONVERTERS.names())}"
            )
        declared = CONVERTER_OPTIONS.get(converter)
        if declared is None:
            continue
        options = dataset["options"]
        for key, value in options.items():
            where = f"datasets.{name}.options.{key}"
            if key not in declared:
                raise ConfigError(
                    f"{source}: {where}: unknown option of converter {converter!r}; "
                    f"its options: {', '.join(sorted(declared))}"
                )
            default = declared[key]
            if default is None or isinstance(default, list):
                continue
            kind = (
                bool
                if isinstance(default, bool)
                else int
                if isinstance(default, int)
                else float
                if isinstance(default, float)
                else str
            )
            coerced = (
                _from_text(value, ["integer" if kind is int else "number" if kind is float else "string"])
                if isinstance(value, str) and kind is not str
                else value
            )
            if coerced is _NOT_CONVERTED or not _fits(coerced, kind):
                raise ConfigError(
                    f"{source}: {where} is {value!r}, which is not {_KIND_NAMES[kind]} (default {default!r})"
                )
            options[key] = coerced
        missing = sorted(CONVERTER_REQUIRED.get(converter, frozenset()) - set(options))
        if missing:
            raise ConfigError(
                f"{source}: datasets.{name}.options needs {', '.join(missing)} for converter {converter!r}"
            )


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _fits(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_references(config: dict[str, Any], source: str) -> None:
    datasets = set(config["datasets"])
    for name, members in config["training_sets"].items():
        for member in members:
            if member not in datasets:
                raise ConfigError(
                    f"{source}: training_sets.{name} names dataset {member!r}, which is not "
                    f"under datasets (defined: {', '.join(sorted(datasets))})"
                )
    if config["evaluation"]["test_sets"] == []:
        raise ConfigError(
            f"{source}: evaluation.test_sets is an empty list, which would score nothing; "
            "name at least one dataset, or write null to score every dataset"
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
            parsed = parse_alignment(name)
        except ValueError as error:
            raise ConfigError(f"{source}: alignment.variants: {error}") from None
        if parsed["rescale"]:
            check_rescale(config, name, source)
    for member in config["training"].get("n_train_slices_for") or []:
        if member not in config["training_sets"]:
            raise ConfigError(
                f"{source}: training.n_train_slices_for names {member!r}, which is not under training_sets"
            )
    for member in config["alignment"]["train_sets"] or []:
        if member not in config["training_sets"]:
            raise ConfigError(f"{source}: alignment.train_sets names {member!r}, which is not under training_sets")
    reference = config["alignment"]["reference"]
    if reference is not None and reference not in datasets:
        raise ConfigError(f"{source}: alignment.reference {reference!r} is not under datasets")
    tile, overlap = config["tiling"]["tile_size"], config["tiling"]["overlap"]
    if config["tiling"]["mode"] == "resize":
        if config["tiling"].get("pixel_size_nm") is not None:
            raise ConfigError(
                f"{source}: tiling.pixel_size_nm applies to tile mode only (resize mode rescales every slice to "
                "longest_edge anyway); set tiling.mode: tile or tiling.pixel_size_nm: null"
            )
        return
    if overlap >= tile:
        raise ConfigError(f"{source}: tiling.overlap ({overlap}) must be smaller than tiling.tile_size ({tile})")
    for name, dataset in config["datasets"].items():
        options = dataset.get("options") or {}
        resampled = config["tiling"].get("pixel_size_nm") is not None  # checked on the resampled slices instead
        if dataset["converter"] == "synthetic" and "height" in options and "width" in options and not resampled:
            check_tile_fits(tile, int(options["height"]), int(options["width"]), f"dataset {name!r}", source)
    from em_foundation.grid import patch_size_of

    for name, backbone in config["backbones"].items():
        patch = patch_size_of(backbone)
        if tile % patch:
            raise ConfigError(
                f"{source}: tiling.tile_size {tile} is not a multiple of the patch size {patch} "
                f"of backbone {name!r}; use a common multiple (448 suits patch 14 and 16)"
            )


def check_rescale(config: dict[str, Any], variant: str, source: str) -> None:
    """The rescale variant resamples native-resolution tiles to alignment.pixel_size_nm, nothing else."""
    if config["alignment"].get("pixel_size_nm") is None:
        raise ConfigError(
            f"{source}: alignment variant {variant!r} resamples every dataset to a common pixel size: "
            "set alignment.pixel_size_nm (nm per pixel, e.g. 5.0)"
        )
    if config["tiling"]["mode"] != "tile":
        raise ConfigError(
            f"{source}: alignment variant {variant!r} needs tiling.mode: tile (resize mode rescales every slice "
            "to longest_edge anyway)"
        )
    if config["tiling"].get("pixel_size_nm") is not None:
        raise ConfigError(
            f"{source}: alignment variant {variant!r} and tiling.pixel_size_nm both set a pixel size; "
            "tiling.pixel_size_nm already resamples every run, so drop one of them"
        )


# The most a pixel size may be resampled by along one side (either way): EM pixel sizes run
# from about 2 to 50 nm, so 16 covers any real pair; beyond it is a typo (500 for 5 nm).
MAX_RESAMPLING = 16.0


def _native_pixel_size(dataset: dict[str, Any]) -> list[float] | None:
    """The [y, x] pixel size a dataset's options give (your own data, Kasthuri's voxel size), or None."""
    options = dataset.get("options") or {}
    value = options.get("pixel_size_nm")
    if value is None and options.get("voxel_size_nm") is not None:
        value = list(options["voxel_size_nm"])[:2]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        return None  # the converter's own check names a malformed value
    return [float(v) for v in value]


def _check_resampling(config: dict[str, Any], source: str) -> None:
    """A common pixel size far from a dataset's own would resample every slice into a huge array."""
    targets = [
        (key, config.get(block, {}).get("pixel_size_nm"))
        for key, block in (("tiling.pixel_size_nm", "tiling"), ("alignment.pixel_size_nm", "alignment"))
    ]
    for key, target in targets:
        if target is None:
            continue
        for name, dataset in config["datasets"].items():
            native = _native_pixel_size(dataset)
            if native is None or min(native) <= 0:
                continue
            factor = max(max(n / target, target / n) for n in native)
            if factor > MAX_RESAMPLING:
                pixels = native[0] / target * native[1] / target  # resampled pixels per native pixel
                raise ConfigError(
                    f"{source}: datasets.{name} has pixel size {native} nm and {key} is {target} nm: every slice would "
                    f"be resampled by {factor:g}× along a side (at most {MAX_RESAMPLING:g}), each 1000×1000 slice into "
                    f"{pixels * 1e6 / 2**30:.3g} GiB of 8-bit pixels. Check both values (a typo such as 500 for 5?)"
                )


def check_tile_fits(tile: int, height: int, width: int, what: str, source: str = "config") -> None:
    """A tile larger than the slices is mostly padding: the backbone pays for pixels that do not exist."""
    if tile > height or tile > width:
        padded = tile * tile / (min(tile, height) * min(tile, width))
        raise ConfigError(
            f"{source}: tiling.tile_size {tile} is larger than the {height}×{width} slices of {what}: the backbone "
            f"would process {padded:.1f}× the pixels, the rest padding. Set tiling.tile_size to at most {min(height, width)} "
            "(a multiple of the patch sizes) or use tiling.mode: resize"
        )


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return validate_config(config or {}, source=str(path))
