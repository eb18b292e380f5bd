"""Registry of dataset converters: a dataset in the config is a converter name plus its source."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from em_foundation.data.prepared import Split
from em_foundation.registry import Registry

# A converter turns a downloaded archive (None for generated datasets) and the dataset's
# config entry into splits at native resolution plus the dataset's attributes.
Converter = Callable[[Optional[Path], dict[str, Any]], tuple[dict[str, Split], dict[str, Any]]]

CONVERTERS: Registry[tuple[dict[str, Split], dict[str, Any]]] = Registry("dataset converter")

# Each converter's ``options`` and their defaults, declared beside the converter, so that the
# config check at start-up names a wrong key or value instead of the job failing hours later.
# A default of None marks a required option without a default.
CONVERTER_OPTIONS: dict[str, dict[str, Any]] = {}


def declare_options(converter: str, defaults: dict[str, Any]) -> dict[str, Any]:
    CONVERTER_OPTIONS[converter] = dict(defaults)
    return defaults
