"""Registry of dataset converters: a dataset in the config is a converter name plus its source.

A converter turns a downloaded archive (None for generated datasets) and the dataset's
config entry into splits at native resolution plus the dataset's attributes.
"""

from __future__ import annotations

import importlib
from typing import Any

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
