"""Datasets: generation or download, conversion to the prepared HDF5, tiling, splits."""

from __future__ import annotations

import importlib

from em_foundation.data.registry import CONVERTERS

# Modules that register converters; imported on first use.
_CONVERTER_MODULES = ("em_foundation.data.synthetic", "em_foundation.data.em_datasets")


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
