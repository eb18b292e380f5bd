"""Registry of dataset converters: a dataset in the config is a converter name plus its source.

A converter turns a downloaded archive (None for generated datasets) and the dataset's
config entry into splits at native resolution plus the dataset's attributes.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from em_foundation.data.prepared import Split
from em_foundation.registry import Registry

CONVERTERS: Registry[tuple[dict[str, Split], dict[str, Any]]] = Registry("dataset converter")

# Modules that register converters; imported on first use.
_CONVERTER_MODULES = ("em_foundation.data.synthetic", "em_foundation.data.em_datasets", "em_foundation.data.generic")

# Each converter's ``options`` and their defaults, declared beside the converter, so that the
# config check at start-up names a wrong key or value instead of the job failing hours later.
# A default of None takes any value (or none); ``required`` options have no default at all.
CONVERTER_OPTIONS: dict[str, dict[str, Any]] = {}
CONVERTER_REQUIRED: dict[str, frozenset[str]] = {}


def declare_options(converter: str, defaults: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    CONVERTER_OPTIONS[converter] = dict(defaults)
    CONVERTER_REQUIRED[converter] = frozenset(required)
    return defaults


# Whether a converter's test split is one block of consecutive sections (a stack), as a
# function of the dataset's options: only then are objects also followed across slices (3-D
# object scores). Declared beside the converter; a converter that declares nothing is not a stack.
CONVERTER_STACK_TEST: dict[str, Callable[[dict[str, Any]], bool]] = {}


def declare_stack_test(converter: str, is_stack: Callable[[dict[str, Any]], bool]) -> None:
    CONVERTER_STACK_TEST[converter] = is_stack


def has_stack_test_split(spec: dict[str, Any]) -> bool:
    """Whether a dataset's test split (config entry: converter and options) is a contiguous stack."""
    get_converter(spec["converter"])
    rule = CONVERTER_STACK_TEST.get(spec["converter"])
    options = {**CONVERTER_OPTIONS.get(spec["converter"], {}), **(spec.get("options") or {})}
    return bool(rule(options)) if rule else False


def converter_options(spec: dict[str, Any], converter: str) -> dict[str, Any]:
    """A dataset's ``options`` over its converter's declared defaults; an undeclared key is refused."""
    from em_foundation.config import ConfigError

    defaults = CONVERTER_OPTIONS[converter]
    options = dict(spec.get("options") or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"datasets.<name>.options: unknown key(s) {unknown} for converter {converter!r}; allowed: {sorted(defaults)}"
        )
    return {**defaults, **options}


def get_converter(name: str):
    for module in _CONVERTER_MODULES:
        if name in CONVERTERS:
            break
        importlib.import_module(module)
    return CONVERTERS.get(name)


def load_converters() -> None:
    """Import every converter module, so that the registry and its option tables are complete."""
    for module in _CONVERTER_MODULES:
        importlib.import_module(module)
