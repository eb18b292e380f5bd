"""Random-weight backbones start from their own seed without resetting the run's random state.

Before, ``torch.manual_seed(init_seed)`` inside the backbone reset the global generator that
the run had seeded, so the LoRA adapters and the head built after it started from identical
weights for every run seed (the demo's tinyvit LoRA runs of seeds 0 and 1).
"""

from __future__ import annotations

import pytest
import torch

from em_foundation.backbones import build_backbone
from em_foundation.backbones.lora import trainable_state_dict
from em_foundation.runtime import seed_everything
from em_foundation.training.segmenter import build_segmenter
from tests.test_lora import NARROW

HEAD = {"width": 16}
LORA = {"rank": 2, "alpha": 4, "dropout": 0.0}


def segmenter(regime: str, spec: dict, seed: int) -> torch.nn.Module:
    seed_everything(seed)
    return build_segmenter(regime, spec, HEAD, LORA, in_channels=8, patch_size=14)


@pytest.mark.parametrize("family", ["dinov2", "dinov3", "openclip"])
def test_building_a_random_backbone_leaves_the_global_state_alone(family):
    seed_everything(5)
    before = torch.get_rng_state()
    first = build_backbone(NARROW[family])
    assert torch.equal(torch.get_rng_state(), before), "the backbone reset or advanced the run's generator"
    seed_everything(6)
    again = build_backbone(NARROW[family])
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name}: random weights must depend on init_seed only, not on the run seed"
    other = build_backbone({**NARROW[family], "options": {**NARROW[family].get("options", {}), "init_seed": 1}})
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))


# The head regime owns no backbone, so one family covers it.
@pytest.mark.parametrize(
    "regime, family", [("head", "dinov2"), *((r, f) for r in ("lora", "fullft") for f in ("dinov2", "openclip"))]
)
def test_run_seeds_start_from_different_trainable_weights(regime, family):
    spec = NARROW[family]
    first, second, again = segmenter(regime, spec, 0), segmenter(regime, spec, 1), segmenter(regime, spec, 0)
    trained = [key for key in trainable_state_dict(first) if not key.startswith("backbone.") or regime != "fullft"]
    differs = [
        key for key in trained if not torch.equal(trainable_state_dict(first)[key], trainable_state_dict(second)[key])
    ]
    state = trainable_state_dict(first)
    heads = [
        key for key in trained if key.startswith("head.") and key.endswith("weight") and state[key].ndim > 1
    ]  # convolutions
    assert heads and set(heads) <= set(differs), "the head starts from the same weights for seeds 0 and 1"
    if regime == "lora":
        adapters = [key for key in trained if "lora_A" in key]
        assert adapters and set(adapters) <= set(differs), "LoRA adapters start from the same weights for seeds 0 and 1"
    if regime != "head":
        frozen_first = {k: v for k, v in first.backbone.state_dict().items() if "lora_" not in k}
        frozen_second = second.backbone.state_dict()
        assert all(torch.equal(v, frozen_second[k]) for k, v in frozen_first.items()), (
            "the backbone weights must not depend on the run seed"
        )
    for key, value in trainable_state_dict(first).items():
        assert torch.equal(value, trainable_state_dict(again)[key]), f"{key}: same seed, same start"
