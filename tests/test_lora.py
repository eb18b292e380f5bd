"""LoRA: adapters only on every block's attention input and output projections, and live.

Narrow random models check behaviour; the real Large architectures, built on the meta
device (shapes without storage), check the adapter counts of the study's setting.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from em_foundation.backbones import build_backbone
from em_foundation.backbones.lora import adapted_modules, add_lora, make_fully_trainable, trainable_state_dict

NARROW = {
    "dinov2": {
        "family": "dinov2",
        "model": "vit_small_patch14_reg4_dinov2.lvd142m",
        "weights": "random",
        "model_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2, "img_size": 56},
    },
    "dinov3": {
        "family": "dinov3",
        "model": "vit_small_patch16_dinov3.lvd1689m",
        "weights": "random",
        "model_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2},
    },
    # DINOv3 with q/v biases: timm's Eva computes qkv with F.linear on the weight there,
    # which would bypass an adapter unless prepare_lora reroutes it.
    "dinov3_qkvb": {
        "family": "dinov3",
        "model": "vit_small_patch16_dinov3_qkvb.lvd1689m",
        "weights": "random",
        "model_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2},
    },
    "openclip": {
        "family": "openclip",
        "model": "ViT-B-16",
        "weights": "random",
        "model_kwargs": {"width": 32, "layers": 3, "head_width": 16, "image_size": 64},
    },
}
SIZES = {"dinov2": (56, 56), "dinov3": (64, 64), "dinov3_qkvb": (64, 64), "openclip": (64, 64)}
ATTENTION = re.compile(r"(.*\.)?(res)?blocks\.\d+\.attn\.(qkv|proj)")

LARGE = {
    "dinov2": {"family": "dinov2", "model": "vit_large_patch14_dinov2.lvd142m"},
    "dinov3": {"family": "dinov3", "model": "vit_large_patch16_dinov3.lvd1689m"},
    "openclip": {"family": "openclip", "model": "ViT-L-14", "options": {"pretrained_tag": "laion2b_s32b_b82k"}},
}


def narrow(name: str) -> dict:
    return copy.deepcopy(NARROW[name])


def x_for(name: str) -> torch.Tensor:
    return torch.rand(1, 1, *SIZES[name], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(NARROW))
def test_adapters_only_on_attention_and_only_they_train(name):
    backbone = add_lora(build_backbone(narrow(name)), rank=4, alpha=8, dropout=0.0)
    adapted = adapted_modules(backbone)
    depth = len(backbone.model.transformer.resblocks if name == "openclip" else backbone.model.blocks)
    assert len(adapted) == 2 * depth
    assert all(ATTENTION.fullmatch(module) for module in adapted), adapted
    assert {module.rsplit(".", 1)[1] for module in adapted} == {"qkv", "proj"}
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(ATTENTION.fullmatch(n.split(".lora_")[0].removeprefix("model.")) for n in trainable)
    # Nothing on MLPs or the patch embedding.
    assert not any(part in n for n in trainable for part in ("mlp", "patch_embed", "conv1", "fc1", "c_fc"))


@pytest.mark.parametrize("name", list(NARROW))
def test_adapters_start_at_zero_and_are_live(name):
    """B = 0 at init (output unchanged); a non-zero adapter on qkv alone changes the output.

    The adapted qkv modules must actually be called: a model computing F.linear on
    ``qkv.weight`` (timm's Eva with q/v bias) would bypass them without any error.
    """
    frozen = build_backbone(narrow(name))
    adapted = add_lora(build_backbone(narrow(name)), rank=4, alpha=8, dropout=0.0)
    x = x_for(name)
    calls = []
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).grid, frozen(x).grid, rtol=1e-5, atol=1e-5)
        for module_name, module in adapted.model.named_modules():
            if module_name.endswith("attn.qkv"):
                module.lora_B["default"].weight.normal_()
                module.register_forward_hook(lambda *args: calls.append(1))
        changed = adapted(x).grid
    assert len(calls) == len(adapted_modules(adapted)) // 2
    # DINO's layer scale starts at 1e-5, so random-init changes are small but not zero.
    assert (changed - frozen(x).grid).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["dinov2", "openclip"])
def test_gradients_reach_only_adapters(name):
    backbone = add_lora(build_backbone(narrow(name)), rank=4, alpha=8, dropout=0.0)
    backbone(x_for(name)).grid.square().mean().backward()
    with_grad = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # B starts at zero, so only B's gradient is non-zero on the first step (A's is B^T-weighted).
    assert any(".lora_B." in n and backbone.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    saved = trainable_state_dict(backbone)
    assert set(saved) == {n for n, p in backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["dinov2", "openclip"])
def test_full_fine_tuning_checkpoint_names_match_parameters(name):
    """fullft checkpoints hold every backbone weight under the name load_state_dict expects."""
    backbone = make_fully_trainable(build_backbone(narrow(name)))
    saved = trainable_state_dict(backbone)
    assert set(saved) == {n for n, _ in backbone.named_parameters()}
    assert set(saved) <= set(backbone.state_dict())
    if name == "openclip":
        assert any(k.endswith("attn.qkv.weight") for k in saved)


def expected_adapter_count(backbone, rank: int) -> int:
    """rank x (in + out) features of every attention qkv and proj Linear, from the modules themselves."""
    total = 0
    for name, module in backbone.model.named_modules():
        if isinstance(module, torch.nn.Linear) and ATTENTION.fullmatch(name):
            total += rank * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("family", list(LARGE))
def test_large_architectures_adapter_counts(family):
    with torch.device("meta"):
        backbone = build_backbone({**LARGE[family], "weights": "random"})
        expected = expected_adapter_count(backbone, rank=16)
        add_lora(backbone, rank=16, alpha=32, dropout=0.0)
    count = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)
    assert count == expected
    blocks = len(adapted_modules(backbone)) // 2
    assert blocks == 24 and backbone.embed_dim == 1024
    # 24 blocks x rank 16 x (1024 + 3072 for qkv, 1024 + 1024 for proj).
    assert count == 24 * 16 * (1024 + 3072 + 1024 + 1024) == 2_359_296
    if family == "dinov2":
        assert count == 2_359_296
