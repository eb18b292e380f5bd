"""The families and regimes tables: one declaration each, read by everything else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from em_foundation import grid
from em_foundation.backbones import load
from em_foundation.config import load_schema
from em_foundation.families import FAMILIES, family_of
from em_foundation.regimes import REGIMES, regime_of


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_row_resolves(name: str) -> None:
    family = FAMILIES[name]
    assert callable(load(family.builder))
    assert family.hub is None or callable(load(family.hub))
    # LoRA needs targets; a family that cannot take adapters must not offer the regime.
    assert (family.lora_targets is not None) == ("lora" in family.regimes)
    assert set(family.regimes) <= set(REGIMES)
    assert len(family.mean) == len(family.std) == 3


def test_grid_aliases_are_views_of_the_tables() -> None:
    assert grid.FAMILY_REGIMES == {name: family.regimes for name, family in FAMILIES.items()}
    assert grid.CACHED_REGIMES == tuple(name for name, regime in REGIMES.items() if regime.cached)
    assert grid.BACKBONE_REGIMES == tuple(name for name, regime in REGIMES.items() if regime.trains_backbone)
    assert {regime.rule for regime in REGIMES.values()} == {f"train_{name}" for name in REGIMES}


def test_schema_enums_come_from_the_tables() -> None:
    schema = load_schema()["properties"]
    assert schema["backbones"]["additionalProperties"]["properties"]["family"]["enum"] == list(FAMILIES)
    assert schema["regimes"]["items"]["enum"] == list(REGIMES)


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(KeyError, match="families: filterbank, dinov2"):
        family_of("dinov9")
    with pytest.raises(KeyError, match="regimes: head, lora"):
        regime_of("partial")


def test_tables_and_grid_import_without_torch_and_weights_without_family_modules() -> None:
    code = (
        "import sys\n"
        "import em_foundation.families, em_foundation.regimes, em_foundation.grid\n"
        "assert 'torch' not in sys.modules, 'the tables must stay torch-free'\n"
        "import em_foundation.backbones.hub\n"
        "loaded = [m for m in ('em_foundation.backbones.timm_vit', 'em_foundation.backbones.openclip') if m in sys.modules]\n"
        "assert not loaded, f'hub imports family modules: {loaded}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
