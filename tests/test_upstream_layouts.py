"""Weights as users hold them: files in their authors' layouts, pinned revisions, constants, gated hubs.

Every file here is written by the test in an upstream layout (the authors' key names and
shapes at a narrow width; one value per tensor, unique to its key) and loaded through the
project's code; the loaded model is then checked key by key. Nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from em_foundation.backbones import build_backbone
from em_foundation.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from em_foundation.backbones.hub import WeightsError, hub_environment
from em_foundation.training.segmenter import build_segmenter

WIDTH, DEPTH = 32, 4


def numbered(keys: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """One value per tensor, unique to its key, so a key loaded into the wrong place shows."""
    return {name: torch.full(shape, (i + 1) / 1000) for i, (name, shape) in enumerate(keys)}


def fake_hub(cache: Path, repo_id: str, snapshots: dict[str, dict], main: str, name: str = "model.safetensors") -> None:
    """huggingface_hub's cache layout with several commits; refs/main names ``main``."""
    repo = cache.resolve() / "huggingface" / "hub" / ("models--" + repo_id.replace("/", "--"))
    for commit, state in snapshots.items():
        (repo / "snapshots" / commit).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)


# ----------------------------------------------------------------------------- Meta's DINOv2 and DINOv3 files

DINOV2 = {
    "family": "dinov2",
    "model": "vit_small_patch14_reg4_dinov2.lvd142m",
    "model_kwargs": {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": 2, "img_size": 56},
}
DINOV3 = {
    "family": "dinov3",
    "model": "vit_small_patch16_dinov3.lvd1689m",
    "model_kwargs": {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": 2},
}

# facebookresearch/dinov2's DinoVisionTransformer state dict (hub ``dinov2_vits14_reg``), narrow.
META_DINOV2_BLOCK = [
    ("norm1.weight", (WIDTH,)),
    ("norm1.bias", (WIDTH,)),
    ("attn.qkv.weight", (3 * WIDTH, WIDTH)),
    ("attn.qkv.bias", (3 * WIDTH,)),
    ("attn.proj.weight", (WIDTH, WIDTH)),
    ("attn.proj.bias", (WIDTH,)),
    ("ls1.gamma", (WIDTH,)),
    ("norm2.weight", (WIDTH,)),
    ("norm2.bias", (WIDTH,)),
    ("mlp.fc1.weight", (4 * WIDTH, WIDTH)),
    ("mlp.fc1.bias", (4 * WIDTH,)),
    ("mlp.fc2.weight", (WIDTH, 4 * WIDTH)),
    ("mlp.fc2.bias", (WIDTH,)),
    ("ls2.gamma", (WIDTH,)),
]
META_DINOV2 = [
    ("cls_token", (1, 1, WIDTH)),
    ("pos_embed", (1, 1 + 16, WIDTH)),  # class token + a 4x4 grid (56 px at patch 14)
    ("register_tokens", (1, 4, WIDTH)),
    ("mask_token", (1, WIDTH)),
    ("patch_embed.proj.weight", (WIDTH, 3, 14, 14)),
    ("patch_embed.proj.bias", (WIDTH,)),
    *[(f"blocks.{b}.{k}", s) for b in range(DEPTH) for k, s in META_DINOV2_BLOCK],
    ("norm.weight", (WIDTH,)),
    ("norm.bias", (WIDTH,)),
]

# facebookresearch/dinov3's DinoVisionTransformer (``dinov3_vits16``), narrow: storage tokens,
# a RoPE periods buffer, LayerScale as ls*.gamma and a qkv bias with its mask.
META_DINOV3_BLOCK = [
    ("norm1.weight", (WIDTH,)),
    ("norm1.bias", (WIDTH,)),
    ("attn.qkv.weight", (3 * WIDTH, WIDTH)),
    ("attn.qkv.bias", (3 * WIDTH,)),
    ("attn.qkv.bias_mask", (3 * WIDTH,)),
    ("attn.proj.weight", (WIDTH, WIDTH)),
    ("attn.proj.bias", (WIDTH,)),
    ("ls1.gamma", (WIDTH,)),
    ("norm2.weight", (WIDTH,)),
    ("norm2.bias", (WIDTH,)),
    ("mlp.fc1.weight", (4 * WIDTH, WIDTH)),
    ("mlp.fc1.bias", (4 * WIDTH,)),
    ("mlp.fc2.weight", (WIDTH, 4 * WIDTH)),
    ("mlp.fc2.bias", (WIDTH,)),
    ("ls2.gamma", (WIDTH,)),
]
META_DINOV3 = [
    ("cls_token", (1, 1, WIDTH)),
    ("storage_tokens", (1, 4, WIDTH)),
    ("mask_token", (1, WIDTH)),
    ("patch_embed.proj.weight", (WIDTH, 3, 16, 16)),
    ("patch_embed.proj.bias", (WIDTH,)),
    ("rope_embed.periods", (4,)),
    *[(f"blocks.{b}.{k}", s) for b in range(DEPTH) for k, s in META_DINOV3_BLOCK],
    ("norm.weight", (WIDTH,)),
    ("norm.bias", (WIDTH,)),
]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_meta_dinov2_file_with_registers_and_mask_token_loads(tmp_path, suffix):
    state = numbered(META_DINOV2)
    path = tmp_path / f"dinov2_vits14_reg4_pretrain{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = build_backbone({**DINOV2, "weights": str(path)}).model.state_dict()
    assert "mask_token" not in loaded  # pretraining only: dropped by timm's conversion
    torch.testing.assert_close(loaded["reg_token"], state["register_tokens"], rtol=0, atol=0)
    # timm's registers model keeps no class position: Meta's is folded into the class token
    torch.testing.assert_close(loaded["cls_token"], state["cls_token"] + state["pos_embed"][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(loaded["pos_embed"], state["pos_embed"][:, 1:], rtol=0, atol=0)
    same_name = [k for k, _ in META_DINOV2 if k not in ("cls_token", "pos_embed", "register_tokens", "mask_token")]
    assert sorted(same_name + ["reg_token", "cls_token", "pos_embed"]) == sorted(loaded)
    for key in same_name:
        assert torch.equal(loaded[key], state[key]), key


def test_meta_dinov3_file_loads_through_timms_conversion(tmp_path):
    state = numbered(META_DINOV3)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(state, path)
    loaded = build_backbone({**DINOV3, "weights": str(path)}).model.state_dict()
    renamed = {"storage_tokens": "reg_token"}
    for b in range(DEPTH):
        renamed[f"blocks.{b}.ls1.gamma"] = f"blocks.{b}.gamma_1"
        renamed[f"blocks.{b}.ls2.gamma"] = f"blocks.{b}.gamma_2"
    # dropped: pretraining's mask token, the RoPE periods (recomputed), the all-zero qkv bias
    # of the distilled models (timm's non-qkvb class has none) and its mask
    dropped = {"mask_token", "rope_embed.periods"} | {
        f"blocks.{b}.attn.qkv.{k}" for b in range(DEPTH) for k in ("bias", "bias_mask")
    }
    expected = {renamed.get(k, k): k for k, _ in META_DINOV3 if k not in dropped}
    assert sorted(expected) == sorted(loaded)
    for timm_key, meta_key in expected.items():
        assert torch.equal(loaded[timm_key], state[meta_key]), meta_key


def test_a_file_that_does_not_fit_names_its_keys(tmp_path):
    state = numbered(META_DINOV3)
    state["blocks.9.attn.proj.weight"] = torch.zeros(WIDTH, WIDTH)  # a deeper model's block
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "deeper.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys.*blocks\.1\.mlp\.fc2\.bias.*unexpected keys.*blocks\.9"):
        build_backbone({**DINOV3, "weights": str(path)})


# ----------------------------------------------------------------------------- SAM2

HIERA = {"family": "sam2", "model": "sam2_hiera_tiny.fb_r896", "model_kwargs": {"embed_dim": 16, "num_heads": 1}}


def sam2_checkpoint() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """SAM2's own file (``{"model": ...}``): the trunk in SAM2's names beside its other modules.

    Names and shapes of sam2's Hiera at this width (``mlp.layers.0/1``, no ``head``): those of
    timm's trunk with SAM2's MLP names. Returns the state and the timm name of each trunk key.
    """
    import timm

    trunk = timm.create_model(HIERA["model"], pretrained=False, num_classes=0, **HIERA["model_kwargs"])
    shapes = {k: tuple(v.shape) for k, v in trunk.state_dict().items() if not k.startswith("head.")}
    sam2_name = {
        k: "image_encoder.trunk." + k.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")
        for k in shapes
    }
    others = [
        ("image_encoder.neck.convs.0.conv.weight", (256, 128, 1, 1)),
        ("memory_attention.layers.0.self_attn.q_proj.weight", (256, 256)),
        ("sam_mask_decoder.iou_token.weight", (1, 256)),
        ("maskmem_tpos_enc", (7, 1, 1, 64)),
    ]
    state = numbered([(sam2_name[k], s) for k, s in shapes.items()] + others)
    return state, {timm_key: name for timm_key, name in sam2_name.items()}


def test_sam2_own_checkpoint_loads_the_trunk_and_trims_after(tmp_path):
    state, names = sam2_checkpoint()
    path = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": state}, path)
    backbone = build_backbone({**HIERA, "weights": str(path)})
    loaded = backbone.model.state_dict()
    kept = {k: n for k, n in names.items() if k in loaded}
    assert len(backbone.model.blocks) == 10 and sorted(kept) == sorted(loaded)
    for timm_key, sam2_key in kept.items():
        assert torch.equal(loaded[timm_key], state[sam2_key]), sam2_key


def test_timms_whole_sam2_trunk_file_loads_and_is_trimmed(tmp_path):
    import timm

    trunk = timm.create_model(HIERA["model"], pretrained=False, num_classes=0, **HIERA["model_kwargs"])
    state = numbered([(k, tuple(v.shape)) for k, v in trunk.state_dict().items()])
    assert "blocks.11.attn.qkv.weight" in state and "head.norm.weight" in state  # beyond the kept stage
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = build_backbone({**HIERA, "weights": str(path)}).model.state_dict()
    assert "blocks.10.attn.qkv.weight" not in loaded
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    state["blocks.2.attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"unexpected keys.*blocks\.2\.attn\.extra\.weight"):
        build_backbone({**HIERA, "weights": str(path)})


# ----------------------------------------------------------------------------- U-Net encoders

UNET = {"family": "unet", "options": {"encoder": "resnet18", "encoder_depth": 2, "decoder_channels": [8, 8]}}


def test_unet_encoder_in_torchvision_layout_loads_as_smp_loads_it(tmp_path):
    """torchvision's resnet18 file: fc.* present, no BatchNorm num_batches_tracked."""
    from segmentation_models_pytorch.encoders import get_encoder

    keys = [(k, tuple(v.shape)) for k, v in get_encoder("resnet18", weights=None).state_dict().items()]
    keys = [(k, s) for k, s in keys if not k.endswith("num_batches_tracked")]
    state = numbered(keys + [("fc.weight", (1000, 512)), ("fc.bias", (1000,))])
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    model = build_segmenter("supervised", {**UNET, "weights": str(path)}, {}, {})
    loaded = model.model.encoder.state_dict()
    checked = [k for k in loaded if not k.endswith("num_batches_tracked")]
    assert checked and all(k in state for k in checked)
    for key in checked:
        assert torch.equal(loaded[key], state[key]), key
    assert all(int(v) == 0 for k, v in loaded.items() if k.endswith("num_batches_tracked"))


# ----------------------------------------------------------------------------- pinned revisions

PINNED, OTHER = "3f2325ff978283d47aa6a1d6878ca20565622683", "b" * 40


def test_smps_pinned_revision_is_read_not_main(tmp_path):
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    assert encoders["resnet18"]["pretrained_settings"]["imagenet"]["revision"] == PINNED
    keys = [(k, tuple(v.shape)) for k, v in get_encoder("resnet18", weights=None).state_dict().items()]
    pinned = numbered(keys)
    newer = {k: v + 1 for k, v in pinned.items()}
    fake_hub(tmp_path, "smp-hub/resnet18.imagenet", {PINNED: pinned, OTHER: newer}, main=OTHER)
    with hub_environment(tmp_path, offline=True):
        model = build_segmenter("supervised", {**UNET, "weights": "pretrained"}, {}, {})
    assert f"smp-hub/resnet18.imagenet@{PINNED}" in model.identity
    assert torch.equal(model.model.encoder.conv1.weight, pinned["conv1.weight"])


def test_timms_at_revision_is_kept(tmp_path, monkeypatch):
    """timm pins some weights as ``hf_hub_id='<repo>@<revision>'``; the fetch and the read keep it."""
    import dataclasses

    import timm

    name = DINOV2["model"]
    cfg = timm.models.get_pretrained_cfg(name)
    pinned_cfg = dataclasses.replace(cfg, hf_hub_id=f"timm/{name}@{PINNED}")
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda n, *a, **k: pinned_cfg if n == name else cfg)
    random = build_backbone({**DINOV2, "weights": "random"})
    pinned = {k: v.contiguous() for k, v in random.model.state_dict().items()}
    fake_hub(tmp_path, f"timm/{name}", {PINNED: pinned, OTHER: {k: v + 1 for k, v in pinned.items()}}, main=OTHER)
    with hub_environment(tmp_path, offline=True):
        loaded = build_backbone({**DINOV2, "weights": "pretrained"})
    assert loaded.identity.endswith(f"hf:timm/{name}@{PINNED}/model.safetensors")
    assert torch.equal(loaded.model.cls_token, pinned["cls_token"])


# ----------------------------------------------------------------------------- normalisation


def test_normalisation_is_the_weights_own_unless_configured():
    sat = {
        "family": "dinov3",
        "model": "vit_large_patch16_dinov3.sat493m",
        "weights": "random",
        "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    }
    backbone = build_backbone(sat)
    torch.testing.assert_close(backbone.mean.flatten(), torch.tensor((0.430, 0.411, 0.296)))
    torch.testing.assert_close(backbone.std.flatten(), torch.tensor((0.213, 0.156, 0.143)))
    imagenet = build_backbone({**sat, "normalisation": "imagenet"})
    assert torch.equal(imagenet.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    lvd = build_backbone({**sat, "model": "vit_large_patch16_dinov3.lvd1689m"})
    assert torch.equal(lvd.std.flatten(), torch.tensor(IMAGENET_STD))


# ----------------------------------------------------------------------------- gated repositories


def test_gated_repository_error_says_what_to_do(tmp_path, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refuse(repo_id, filename, **kwargs):
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        response = httpx2.Response(403, request=httpx2.Request("GET", url))
        raise GatedRepoError("403 Client Error.", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    repo = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    from em_foundation.backbones.hub import HubSource, resolve_pretrained

    source = HubSource(repo_id=repo, filenames=("model.safetensors",), label="dinov3_l")
    with hub_environment(tmp_path, offline=False), pytest.raises(WeightsError) as caught:
        resolve_pretrained({"family": "dinov3"}, source)
    message = str(caught.value)
    assert f"repository {repo}" in message and f"https://huggingface.co/{repo}" in message
    assert "accept its licence on its page" in message and "HF_TOKEN" in message and "login node" in message
