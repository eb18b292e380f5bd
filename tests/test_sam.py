"""The sam family: SAM's image encoder and micro-sam's EM models, from random weights.

Narrow 4-block encoders check grids, preprocessing, features and checkpoint loading; the
real ViT-B/L/H, built on the meta device (shapes without storage), check the LoRA and
parameter counts. Nothing here downloads: micro-sam's files are written by the tests and
served from 127.0.0.1 or a file:// URL.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from em_foundation.backbones import build_backbone
from em_foundation.backbones import sam as sam_module
from em_foundation.backbones.base import IMAGENET_MEAN, IMAGENET_STD, seeded_init
from em_foundation.backbones.hub import WeightsError, fetch_weights, file_checksum, hub_environment
from em_foundation.backbones.lora import adapted_modules, add_lora, make_fully_trainable, trainable_state_dict
from em_foundation.backbones.sam import BACKBONE_PRESETS, MICRO_SAM_MODELS, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from em_foundation.grid import patch_size_of
from em_foundation.io import file_sha256

# SAM's layout (windowed blocks with global attention in between, relative positions, a
# neck) at toy width: native grid 8x8 (128 pixels), windows of 4 tokens.
TINY = {
    "family": "sam",
    "model": "samvit_base_patch16",
    "weights": "random",
    "model_kwargs": {
        "depth": 4,
        "embed_dim": 32,
        "num_heads": 2,
        "global_attn_indexes": [1, 3],
        "window_size": 4,
        "neck_chans": 16,
        "img_size": 128,
    },
}
ATTENTION = re.compile(r"blocks\.\d+\.attn\.(qkv|proj)")


def tiny(**changes) -> dict:
    spec = copy.deepcopy(TINY)
    spec.update(changes)
    return spec


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encoder():
    return build_backbone(tiny())


# segment-anything's own names and shapes of TINY's encoder, written once from
# segment_anything.modeling.ImageEncoderViT(img_size=128, embed_dim=32, depth=4, num_heads=2,
# window_size=4, global_attn_indexes=[1, 3], out_chans=16); a real ViT-B file has the same
# names with 12 blocks. The windowed blocks' relative-position tables are 2*4-1 long, the
# global blocks' 2*8-1.
SEGMENT_ANYTHING_TOP = [
    ("image_encoder.pos_embed", (1, 8, 8, 32)),
    ("image_encoder.patch_embed.proj.weight", (32, 3, 16, 16)),
    ("image_encoder.patch_embed.proj.bias", (32,)),
    ("image_encoder.neck.0.weight", (16, 32, 1, 1)),
    ("image_encoder.neck.1.weight", (16,)),
    ("image_encoder.neck.1.bias", (16,)),
    ("image_encoder.neck.2.weight", (16, 16, 3, 3)),
    ("image_encoder.neck.3.weight", (16,)),
    ("image_encoder.neck.3.bias", (16,)),
]
SEGMENT_ANYTHING_BLOCK = [
    ("norm1.weight", (32,)),
    ("norm1.bias", (32,)),
    ("attn.rel_pos_h", ("rel", 16)),
    ("attn.rel_pos_w", ("rel", 16)),
    ("attn.qkv.weight", (96, 32)),
    ("attn.qkv.bias", (96,)),
    ("attn.proj.weight", (32, 32)),
    ("attn.proj.bias", (32,)),
    ("norm2.weight", (32,)),
    ("norm2.bias", (32,)),
    ("mlp.lin1.weight", (128, 32)),
    ("mlp.lin1.bias", (128,)),
    ("mlp.lin2.weight", (32, 128)),
    ("mlp.lin2.bias", (32,)),
]
RELATIVE_POSITIONS = {0: 7, 1: 15, 2: 7, 3: 15}
# a few of segment-anything's prompt encoder and mask decoder tensors (ignored on purpose)
SEGMENT_ANYTHING_OTHERS = [
    ("prompt_encoder.point_embeddings.0.weight", (1, 16)),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", (2, 8)),
    ("mask_decoder.iou_token.weight", (1, 16)),
    ("mask_decoder.output_upscaling.0.weight", (16, 4, 2, 2)),
]


def segment_anything_keys() -> list[tuple[str, tuple[int, ...]]]:
    blocks = [
        (f"image_encoder.blocks.{b}.{name}", tuple(RELATIVE_POSITIONS[b] if d == "rel" else d for d in shape))
        for b in RELATIVE_POSITIONS
        for name, shape in SEGMENT_ANYTHING_BLOCK
    ]
    return SEGMENT_ANYTHING_TOP + blocks + SEGMENT_ANYTHING_OTHERS


def sam_state_dict() -> dict[str, torch.Tensor]:
    """A segment-anything checkpoint of TINY's shape: one value per tensor, unique to its key."""
    return {name: torch.full(shape, (i + 1) / 1000) for i, (name, shape) in enumerate(segment_anything_keys())}


def timm_name(sam_key: str) -> str:
    """The name timm's VisionTransformerSAM gives a segment-anything encoder key (its two renames)."""
    return sam_key.removeprefix("image_encoder.").replace("mlp.lin1", "mlp.fc1").replace("mlp.lin2", "mlp.fc2")


def assert_loaded_key_by_key(backbone, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.model.state_dict()
    encoder_keys = [k for k in state if k.startswith("image_encoder.")]
    assert sorted(timm_name(k) for k in encoder_keys) == sorted(loaded)
    for key in encoder_keys:
        assert torch.equal(loaded[timm_name(key)], state[key]), key


def micro_sam_file(path: Path, wrapped: bool = False) -> Path:
    """A checkpoint in micro-sam's format: SAM's full state dict (encoder, prompt encoder, mask decoder)."""
    state = sam_state_dict()
    if wrapped:  # micro-sam's training format: the model under model_state with a "sam." prefix
        state = {"model_state": {f"sam.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- grids and preprocessing


@pytest.mark.parametrize("size", [(448, 448), (752, 1008), (128, 128)])
def test_neck_grid_shape_for_tiles_and_resized_slices(encoder, size):
    """448 tiles give 28x28, a 752x1008 slice 47x63: positional embeddings follow the grid."""
    assert encoder.patch_size == 16 == patch_size_of(tiny())
    assert tuple(encoder.model.pos_embed.shape[1:3]) == (8, 8)  # native grid, resampled per call
    x = images(*size, batch=1)
    with torch.no_grad():
        out = encoder(x)
        reference = encoder.model.forward_features(encoder.normalise(x))  # timm: blocks, then the neck
    assert encoder.embed_dim == 16  # the neck's channels
    assert out.grid.shape == (1, 16, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(out.grid, reference)
    torch.testing.assert_close(out.pooled, out.grid.mean(dim=(2, 3)))


def test_sam_preprocessing_is_imagenet_on_unit_inputs(encoder):
    """SAM's 0-255 pixel mean/std divided by 255 are ImageNet's constants, so 'family' = 'imagenet'."""
    assert SAM_PIXEL_MEAN == (123.675, 116.28, 103.53) and SAM_PIXEL_STD == (58.395, 57.12, 57.375)
    torch.testing.assert_close(torch.tensor(SAM_PIXEL_MEAN) / 255, torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(torch.tensor(SAM_PIXEL_STD) / 255, torch.tensor(IMAGENET_STD))
    assert torch.equal(encoder.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(encoder.std.flatten(), torch.tensor(IMAGENET_STD))
    # SAM's own preprocessing of the 0-255 image the [0, 1] input stands for.
    x = images(32, 48, batch=1)
    pixels = x.expand(-1, 3, -1, -1) * 255
    sam = (pixels - torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.normalise(x), sam)
    clip = build_backbone(tiny(normalisation="clip"))
    assert not torch.equal(clip.mean, encoder.mean)


def test_block_features_multi_level_and_their_errors(encoder):
    multi = build_backbone(tiny(layers=[-4, -3, -2, -1], options={"features": "block"}))
    last = build_backbone(tiny(options={"features": "block"}))
    assert multi.embed_dim == 4 * 32 and last.embed_dim == 32
    assert isinstance(multi.model.neck, torch.nn.Identity)  # unused: neither counted nor trained
    x = images(64, 96, batch=1)
    with torch.no_grad():
        grid = multi(x).grid
        tokens = last.model.forward_intermediates(last.normalise(x), indices=[3], intermediates_only=True)[0]
    assert grid.shape == (1, 128, 4, 6)
    torch.testing.assert_close(grid[:, -32:], tokens)  # ascending blocks: the last one last
    torch.testing.assert_close(last(x).grid, tokens)
    assert multi.identity.endswith("features=block") and encoder.identity.endswith("features=neck")
    with pytest.raises(ValueError, match="neck was trained on the last block only"):
        build_backbone(tiny(layers=[-2, -1]))
    with pytest.raises(ValueError, match="'pooled' is not one of neck, block"):
        build_backbone(tiny(options={"features": "pooled"}))
    with pytest.raises(ValueError, match="no class token"):
        build_backbone(tiny(pooling="cls"))


def test_random_init_is_seeded(encoder):
    same = build_backbone(tiny())
    other = build_backbone(tiny(options={"init_seed": 1}))
    x = images(64, 64, batch=1)
    with torch.no_grad():
        assert torch.equal(same(x).grid, encoder(x).grid)
        assert not torch.allclose(other(x).grid, encoder(x).grid)
    assert other.identity != encoder.identity


# ----------------------------------------------------------------------------- LoRA and full fine-tuning


def test_lora_on_every_attention_qkv_and_proj_and_live():
    frozen = build_backbone(tiny())
    adapted = add_lora(build_backbone(tiny()), rank=4, alpha=8, dropout=0.0)
    names = adapted_modules(adapted)
    assert len(names) == 2 * 4 and all(ATTENTION.fullmatch(name) for name in names), names
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(part in n for n in trainable for part in ("neck", "patch_embed", "mlp"))
    x = images(64, 64, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).grid, frozen(x).grid)  # B = 0 at start
        for name, module in adapted.model.named_modules():
            if name.endswith("attn.qkv"):
                module.lora_B["default"].weight.normal_()
        assert (adapted(x).grid - frozen(x).grid).abs().max() > 1e-4


def test_sam_vit_b_lora_rank_16_adapter_count():
    """12 blocks x rank 16 x (768 + 2304 for qkv, 768 + 768 for proj) = 884,736, from the module shapes."""
    with torch.device("meta"):
        backbone = build_backbone({"family": "sam", "model": "samvit_base_patch16.sa1b", "weights": "random"})
        expected = sum(
            16 * (module.in_features + module.out_features)
            for name, module in backbone.model.named_modules()
            if isinstance(module, torch.nn.Linear) and ATTENTION.fullmatch(name)
        )
        add_lora(backbone, rank=16, alpha=32, dropout=0.0)
    count = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)
    assert len(adapted_modules(backbone)) == 24 and backbone.model.embed_dim == 768
    assert count == expected == 12 * 16 * (768 + 3 * 768 + 768 + 768) == 884_736


def test_full_fine_tuning_trains_every_parameter():
    backbone = make_fully_trainable(build_backbone(tiny()))
    assert all(p.requires_grad for p in backbone.parameters())
    backbone(images(64, 64, batch=1)).grid.square().mean().backward()
    assert all(p.grad is not None for p in backbone.parameters())
    saved = trainable_state_dict(backbone)
    assert set(saved) == {n for n, _ in backbone.named_parameters()}
    assert any(k.startswith("model.neck.") for k in saved) and any(".attn.rel_pos_h" in k for k in saved)


# ----------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("wrapped", [False, True], ids=["segment_anything", "micro_sam_training"])
def test_micro_sam_checkpoint_loads_strictly(encoder, tmp_path, wrapped):
    """Every encoder key used; prompt encoder and mask decoder ignored on purpose."""
    path = micro_sam_file(tmp_path / "vit_b_em.pt", wrapped=wrapped)
    loaded = build_backbone(tiny(weights=str(path)))
    assert loaded.identity == f"file:{path.name}:sha256={file_sha256(path)}|features=neck"
    assert_loaded_key_by_key(loaded, sam_state_dict())


def test_unknown_checkpoint_keys_are_refused_by_name(encoder, tmp_path):
    state = sam_state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    state["memory_encoder.proj.weight"] = torch.zeros(2, 2)  # a SAM2 part, say: not SAM's encoder
    path = tmp_path / "stray.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"memory_encoder\.proj\.weight") as caught:
        build_backbone(tiny(weights=str(path)))
    assert str(path) in str(caught.value) and "mask_decoder" not in str(caught.value)


def test_missing_encoder_key_is_named(encoder, tmp_path):
    state = sam_state_dict()
    del state["image_encoder.blocks.2.mlp.lin1.weight"]
    path = tmp_path / "incomplete.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys.*blocks\.2\.mlp\.fc1\.weight"):
        build_backbone(tiny(weights=str(path)))


def test_own_state_dict_round_trip_and_unreadable_file(encoder, tmp_path):
    path = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    loaded = build_backbone(tiny(weights=str(path)))
    x = images(64, 64, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(x).grid, encoder(x).grid)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=str(garbage)):
        build_backbone(tiny(weights=str(garbage)))


# ----------------------------------------------------------------------------- pretrained weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_sam_pretrained_loads_offline_from_the_hub_cache(encoder, tmp_path):
    spec = tiny(model="samvit_base_patch16.sa1b", weights="pretrained")
    repo = tmp_path.resolve() / "huggingface" / "hub" / "models--timm--samvit_base_patch16.sa1b"
    path = repo / "snapshots" / COMMIT / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    with hub_environment(tmp_path, offline=True):
        loaded = build_backbone(spec)
    assert loaded.identity.startswith("timm:samvit_base_patch16.sa1b|hf:timm/samvit_base_patch16.sa1b@" + COMMIT)
    x = images(64, 64, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(x).grid, encoder(x).grid)


def test_micro_sam_table_is_as_published():
    assert set(MICRO_SAM_MODELS) == {"vit_b_em_organelles", "vit_l_em_organelles"}
    for entry in MICRO_SAM_MODELS.values():
        assert re.fullmatch(r"xxh128:[0-9a-f]{32}", entry["checksum"])
        assert entry["url"].startswith("https://") and entry["model"] in ("samvit_base_patch16", "samvit_large_patch16")
    with pytest.raises(WeightsError, match="known: vit_b_em_organelles, vit_l_em_organelles"):
        build_backbone(tiny(weights="pretrained", options={"micro_sam": "vit_h_em_organelles"}))
    with pytest.raises(WeightsError, match="set model: samvit_large_patch16"):
        build_backbone(tiny(weights="pretrained", options={"micro_sam": "vit_l_em_organelles"}))


@pytest.fixture
def published(encoder, tmp_path, monkeypatch):
    """A micro-sam model 'published' under tmp_path/server, with its xxh128 in the table."""
    served = tmp_path / "server"
    served.mkdir()
    path = micro_sam_file(served / "vit_b.pt")
    entry = {"model": "samvit_base_patch16", "url": "", "checksum": f"xxh128:{file_checksum(path, 'xxh128')}"}
    monkeypatch.setitem(MICRO_SAM_MODELS, "vit_b_em_organelles", entry)
    return entry, path


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_fetch_weights_downloads_and_verifies_micro_sam(encoder, published, tmp_path, http_server, scheme):
    entry, path = published
    entry["url"] = http_server(path.parent).url("vit_b.pt") if scheme == "http" else path.as_uri()
    spec = tiny(weights="pretrained", options={"micro_sam": "vit_b_em_organelles"})
    cache = tmp_path / "cache"
    with hub_environment(cache, offline=True), pytest.raises(WeightsError, match="fetch_weights"):
        build_backbone(spec)
    record = fetch_weights(spec, cache)
    cached = cache.resolve() / "torch" / "checkpoints" / "micro_sam" / "vit_b_em_organelles" / "vit_b.pt"
    assert record["source"] == "url" and record["checksum"] == entry["checksum"]
    assert record["files"][0]["path"] == str(cached) and record["files"][0]["sha256"] == file_sha256(path)
    assert record["identity"] == f"url:{entry['url']}#{entry['checksum']}"
    with hub_environment(cache, offline=True):
        loaded = build_backbone(spec)
    assert loaded.identity == f"micro_sam:vit_b_em_organelles|{record['identity']}|features=neck"
    assert_loaded_key_by_key(loaded, sam_state_dict())


def test_fetch_weights_refuses_a_file_with_another_checksum(published, tmp_path):
    entry, path = published
    entry["url"] = path.as_uri()
    entry["checksum"] = "xxh128:" + "0" * 32
    cache = tmp_path / "cache"
    spec = tiny(weights="pretrained", options={"micro_sam": "vit_b_em_organelles"})
    with pytest.raises(WeightsError, match="checksum mismatch.*expected xxh128:0{32}"):
        fetch_weights(spec, cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-verified left behind


# ----------------------------------------------------------------------------- parameter table


def test_parameter_table_lists_sam_and_micro_sam_totals(tmp_path):
    import timm

    from em_foundation.backbones.parameters import parameter_table
    from em_foundation.heads.deconv import DeconvHead

    config = {
        "backbones": {name: dict(spec, weights="pretrained") for name, spec in BACKBONE_PRESETS.items()},
        "regimes": ["head", "lora", "fullft"],
        "head": {"width": 512},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
    }
    with hub_environment(tmp_path, offline=True):  # empty and offline: nothing is read or fetched
        table = parameter_table(config).set_index(["backbone", "regime"])
    head = sum(p.numel() for p in DeconvHead(256, 512).parameters())
    for name, spec in BACKBONE_PRESETS.items():
        with torch.device("meta"):
            reference = timm.create_model(spec["model"], pretrained=False, num_classes=0)
        encoder = sum(p.numel() for p in reference.parameters())
        assert table.loc[(name, "head"), "backbone_params"] == encoder, name
        assert table.loc[(name, "head"), "total_params"] == encoder + head
        assert table.loc[(name, "fullft"), "trainable_params"] == encoder + head
        assert table.loc[(name, "lora"), "embed_dim"] == 256
    encoders = table.xs("head", level="regime").backbone_params.to_dict()
    assert encoders["usam_b_em"] == encoders["sam_b"] and encoders["usam_l_em"] == encoders["sam_l"]
    assert encoders["sam_b"] < encoders["sam_l"] < encoders["sam_h"]
    assert table.loc[("sam_b", "lora"), "adapter_params"] == 884_736


def test_module_table_and_family_row_agree():
    from em_foundation.families import FAMILIES

    row = FAMILIES["sam"]
    assert row.builder == "sam:build" and row.hub == "sam:hub_source" and row.default_patch == 16
    assert set(row.options) == {"init_seed", "features", "micro_sam", "input"}
    assert sam_module.INPUTS[0] == "native"  # the default: today's input mode
    assert sam_module.FEATURES[0] == "neck"  # the default


# ----------------------------------------------------------------------------- SAM2 (Hiera)

HIERA = {
    "family": "sam2",
    "model": "sam2_hiera_tiny.fb_r896",
    "weights": "random",
    "model_kwargs": {"embed_dim": 16, "num_heads": 1},  # stages (1, 2, 7, 2): blocks 3-9 at stride 16
}


def hiera(**changes) -> dict:
    spec = copy.deepcopy(HIERA)
    spec.update(changes)
    return spec


@pytest.mark.parametrize("size", [(448, 448), (752, 1008)])
def test_sam2_stride_16_stage_is_the_grid(size):
    import timm

    backbone = build_backbone(hiera())
    assert backbone.patch_size == 16 == patch_size_of(hiera())
    assert len(backbone.model.blocks) == 10 and backbone.embed_dim == 64  # the stride-32 stage is gone
    x = images(*size, batch=1)
    with torch.no_grad():
        grid = backbone(x).grid
    assert grid.shape == (1, 64, size[0] // 16, size[1] // 16)
    if size == (448, 448):  # a multiple of 32: nothing padded, so timm's whole trunk gives the same stage
        with torch.no_grad(), seeded_init(0):
            full = timm.create_model(
                "sam2_hiera_tiny.fb_r896", pretrained=False, num_classes=0, embed_dim=16, num_heads=1
            )
        full.eval()
        with torch.no_grad():
            stage = full.forward_intermediates(backbone.normalise(x), indices=[2], intermediates_only=True)[0]
        torch.testing.assert_close(grid, stage)


def test_sam2_layers_lora_and_weights_file(tmp_path):
    backbone = build_backbone(hiera())
    multi = build_backbone(hiera(layers=[-3, -1]))
    assert multi.embed_dim == 128 and multi.block_indices == [7, 9]
    with pytest.raises(ValueError, match="outside"):
        build_backbone(hiera(layers=[-8]))  # the stride-16 stage has 7 blocks
    with pytest.raises(ValueError, match="no class token"):
        build_backbone(hiera(pooling="cls"))
    adapted = add_lora(build_backbone(hiera()), rank=4, alpha=8, dropout=0.0)
    names = adapted_modules(adapted)
    assert len(names) == 20 and all(ATTENTION.fullmatch(name) for name in names)
    path = tmp_path / "hiera.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    loaded = build_backbone(hiera(weights=str(path), options={"init_seed": 5}))
    x = images(64, 96, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(x).grid, backbone(x).grid)
    state = dict(backbone.model.state_dict())
    state["blocks.11.attn.qkv.weight"] = torch.zeros(1)  # a block of the dropped stride-32 stage
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match=r"blocks\.11\.attn\.qkv\.weight"):
        build_backbone(hiera(weights=str(path)))
