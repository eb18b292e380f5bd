"""Backbone families from random weights: token grids, normalisation, weights files and the hub cache.

Nothing here downloads: pretrained loading is exercised on a Hugging Face cache that the
tests lay out themselves (the layout huggingface_hub writes), offline.
"""

from __future__ import annotations

import copy
import json
import runpy
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from em_foundation.backbones import build_backbone
from em_foundation.backbones.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from em_foundation.backbones.hub import WeightsError, fetch_weights, file_sha256, hub_environment, hub_settings
from em_foundation.grid import patch_size_of

REPO = Path(__file__).resolve().parents[1]

# Narrow, 4-block versions of each family's architecture (random weights, seconds to build).
NARROW = {
    "dinov2": {
        "family": "dinov2",
        "model": "vit_small_patch14_reg4_dinov2.lvd142m",
        "weights": "random",
        "model_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 56},
    },
    "dinov3": {
        "family": "dinov3",
        "model": "vit_small_patch16_dinov3.lvd1689m",
        "weights": "random",
        "model_kwargs": {"depth": 4, "embed_dim": 32, "num_heads": 2},
    },
    "openclip": {
        "family": "openclip",
        "model": "ViT-B-16",
        "weights": "random",
        "model_kwargs": {"width": 32, "layers": 4, "head_width": 16, "image_size": 64},
    },
}
# A size that is a multiple of the patch but not the model's native grid (tests interpolation).
SIZES = {"dinov2": (56, 84), "dinov3": (64, 80), "openclip": (48, 96)}
PREFIX_TOKENS = {"dinov2": 5, "dinov3": 5, "openclip": 1}  # class + registers


def spec_of(family: str, **changes) -> dict:
    spec = copy.deepcopy(NARROW[family])
    spec.update(changes)
    return spec


def images(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *SIZES[family], generator=generator)


def source_state_dict(backbone) -> dict[str, torch.Tensor]:
    """The weights in the format a user's checkpoint file has (open_clip's names for OpenCLIP)."""
    state = {k: v.detach().clone().contiguous() for k, v in backbone.model.state_dict().items()}
    if backbone.family == "openclip":
        from em_foundation.backbones.openclip import to_open_clip_state_dict

        state = to_open_clip_state_dict(state)
    return state


@pytest.fixture(scope="module")
def random_backbones():
    return {family: build_backbone(spec_of(family)) for family in NARROW}


# ----------------------------------------------------------------------------- grids and tokens


@pytest.mark.parametrize("family", list(NARROW))
def test_grid_shape_and_prefix_tokens_dropped(family, random_backbones):
    backbone = random_backbones[family]
    height, width = SIZES[family]
    patch = {"dinov2": 14, "dinov3": 16, "openclip": 16}[family]
    assert backbone.patch_size == patch == patch_size_of(backbone_spec := spec_of(family))
    x = images(family)
    with torch.no_grad():
        out = backbone(x)
    assert out.grid.shape == (2, backbone.embed_dim, height // patch, width // patch)
    assert out.pooled.shape == (2, backbone.embed_dim)
    # The grid is exactly the patch tokens of the full sequence: prefix tokens are gone.
    with torch.no_grad():
        if family == "openclip":
            tokens = _open_clip_tokens(backbone, backbone_spec, x)
        else:
            assert backbone.model.num_prefix_tokens == PREFIX_TOKENS[family]
            tokens = backbone.model.forward_features(backbone.normalise(x))
    assert tokens.shape[1] == PREFIX_TOKENS[family] + (height // patch) * (width // patch)
    flat = out.grid.flatten(2).transpose(1, 2)
    torch.testing.assert_close(flat, tokens[:, PREFIX_TOKENS[family] :], rtol=1e-5, atol=1e-5)


def _open_clip_tokens(backbone, spec, x):
    """All tokens of open_clip's own visual tower, same weights, final LayerNorm applied."""
    from em_foundation.backbones.openclip import build_visual, to_open_clip_state_dict

    visual = build_visual(spec)
    visual.proj = None
    state = to_open_clip_state_dict(backbone.model.state_dict())
    # open_clip's tower has a fixed grid: give it the positional embedding resized for x.
    height, width = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
    state["positional_embedding"] = backbone._positional_embedding(height, width).detach()
    visual.positional_embedding = torch.nn.Parameter(state["positional_embedding"].clone())
    visual.load_state_dict(state, strict=True)
    visual.eval()
    embedded = visual._embeds(backbone.normalise(x))
    return visual.ln_post(visual.transformer(embedded))


def test_openclip_matches_open_clip_forward_intermediates_at_native_size(random_backbones):
    """At the model's own image size no interpolation happens and open_clip's API agrees."""
    from em_foundation.backbones.openclip import build_visual, to_open_clip_state_dict

    backbone = random_backbones["openclip"]
    visual = build_visual(spec_of("openclip"))
    visual.proj = None
    visual.load_state_dict(to_open_clip_state_dict(backbone.model.state_dict()), strict=True)
    visual.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        reference = visual.forward_intermediates(
            backbone.normalise(x), indices=[3], normalize_intermediates=True, intermediates_only=True
        )["image_intermediates"][0]
        ours = backbone(x).grid
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(backbone._positional_embedding(4, 4), backbone.model.positional_embedding)


@pytest.mark.parametrize("family", list(NARROW))
def test_multi_level_layers_concatenate_channels(family, random_backbones):
    single = random_backbones[family]
    multi = build_backbone(spec_of(family, layers=[-4, -3, -2, -1]))
    assert multi.embed_dim == 4 * single.embed_dim
    x = images(family, batch=1)
    with torch.no_grad():
        grid = multi(x).grid
        last = single(x).grid
    assert grid.shape[1] == 4 * single.embed_dim
    # Ascending block order: the last block's tokens are the last slice.
    torch.testing.assert_close(grid[:, -single.embed_dim :], last)
    with pytest.raises(ValueError, match="same block twice"):
        build_backbone(spec_of(family, layers=[-1, 3]))
    with pytest.raises(ValueError, match="outside"):
        build_backbone(spec_of(family, layers=[4]))


@pytest.mark.parametrize("family", list(NARROW))
def test_pooled_cls_and_mean_differ(family, random_backbones):
    mean_pooled = random_backbones[family]
    cls_pooled = build_backbone(spec_of(family, pooling="cls"))
    x = images(family, batch=1)
    with torch.no_grad():
        a, b = mean_pooled(x), cls_pooled(x)
    torch.testing.assert_close(a.grid, b.grid)
    torch.testing.assert_close(a.pooled, a.grid.mean(dim=(2, 3)))
    assert b.pooled.shape == a.pooled.shape
    assert not torch.allclose(a.pooled, b.pooled)


def test_normalisation_constants():
    def uses(spec, mean, std) -> bool:
        backbone = build_backbone(spec)
        return torch.equal(backbone.mean.flatten(), torch.tensor(mean)) and torch.equal(
            backbone.std.flatten(), torch.tensor(std)
        )

    assert uses(spec_of("dinov2"), IMAGENET_MEAN, IMAGENET_STD)
    assert uses(spec_of("dinov3"), IMAGENET_MEAN, IMAGENET_STD)
    # OpenCLIP: OpenAI CLIP's constants by default ...
    assert uses(spec_of("openclip"), CLIP_MEAN, CLIP_STD)
    # ... the checkpoint's own when its tag records what it was trained with (LAION ViT-L-14: Inception's) ...
    tagged = spec_of("openclip", model="ViT-L-14", options={"pretrained_tag": "laion2b_s32b_b82k"})
    tagged["model_kwargs"]["patch_size"] = 14
    assert uses(tagged, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert uses(spec_of("openclip", options={"pretrained_tag": "laion2b_s34b_b88k"}), CLIP_MEAN, CLIP_STD)
    # ... and the published (mismatched) ImageNet constants as an option.
    assert uses(spec_of("openclip", normalisation="imagenet"), IMAGENET_MEAN, IMAGENET_STD)
    assert uses({**tagged, "normalisation": "imagenet"}, IMAGENET_MEAN, IMAGENET_STD)
    # OpenAI CLIP's constants on request, whatever the tag recorded, and for any family.
    assert uses({**tagged, "normalisation": "clip"}, CLIP_MEAN, CLIP_STD)
    assert uses(spec_of("dinov2", normalisation="clip"), CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="'inception' is not one of family, imagenet, clip"):
        build_backbone(spec_of("dinov2", normalisation="inception"))


def test_openclip_config_errors():
    with pytest.raises(ValueError, match="pretrained_tag"):
        build_backbone(spec_of("openclip", model="ViT-L-14/laion2b_s32b_b82k"))
    with pytest.raises(ValueError, match="known tags"):
        build_backbone(spec_of("openclip", options={"pretrained_tag": "no_such_tag"}))
    with pytest.raises(WeightsError, match="pretrained_tag"):
        build_backbone(spec_of("openclip", weights="pretrained"))


# ----------------------------------------------------------------------------- weights files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("family", list(NARROW))
def test_weights_file_round_trip(family, suffix, random_backbones, tmp_path):
    original = random_backbones[family]
    path = tmp_path / f"{family}{suffix}"
    state = source_state_dict(original)
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = build_backbone(spec_of(family, weights=str(path), options={"init_seed": 7}))
    assert loaded.identity == f"file:{path.name}:sha256={file_sha256(path)}"
    assert loaded.identity != original.identity
    x = images(family)
    with torch.no_grad():
        a, b = original(x), loaded(x)
    assert torch.equal(a.grid, b.grid) and torch.equal(a.pooled, b.pooled)


def test_openclip_accepts_its_own_state_dict(random_backbones, tmp_path):
    """backbone.model.state_dict() (qkv/proj names) loads as well as open_clip's names."""
    original = random_backbones["openclip"]
    path = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in original.model.state_dict().items()}, str(path))
    loaded = build_backbone(spec_of("openclip", weights=str(path)))
    x = images("openclip")
    with torch.no_grad():
        assert torch.equal(original(x).grid, loaded(x).grid)


def test_openclip_accepts_a_full_clip_checkpoint(random_backbones, tmp_path):
    """A file with the whole CLIP model (visual.*, text tower, logit scale) loads its visual part."""
    original = random_backbones["openclip"]
    state = {f"visual.{k}": v for k, v in source_state_dict(original).items()}
    state["visual.proj"] = torch.zeros(32, 512)
    state["logit_scale"] = torch.ones(())
    state["token_embedding.weight"] = torch.zeros(10, 8)
    path = tmp_path / "clip_full.pt"
    torch.save(state, path)
    loaded = build_backbone(spec_of("openclip", weights=str(path)))
    x = images("openclip")
    with torch.no_grad():
        assert torch.equal(original(x).grid, loaded(x).grid)


@pytest.mark.parametrize("family", list(NARROW))
def test_wrong_keys_name_the_file_and_the_keys(family, random_backbones, tmp_path):
    state = source_state_dict(random_backbones[family])
    victim = next(k for k in state if k.endswith("mlp.fc1.weight") or k.endswith("mlp.c_fc.weight"))
    state["renamed." + victim] = state.pop(victim)
    path = tmp_path / f"{family}_wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as caught:
        build_backbone(spec_of(family, weights=str(path)))
    message = str(caught.value)
    assert str(path) in message and victim in message and "renamed." + victim in message


@pytest.mark.parametrize("family", list(NARROW))
def test_wrong_shapes_name_the_file_and_the_key(family, tmp_path):
    """A checkpoint of a wider model: same keys, other shapes."""
    wider = build_backbone(
        spec_of(
            family,
            model_kwargs={
                **NARROW[family]["model_kwargs"],
                **({"embed_dim": 64} if family != "openclip" else {"width": 64}),
            },
        )
    )
    path = tmp_path / f"{family}_wider.safetensors"
    save_file(source_state_dict(wider), str(path))
    with pytest.raises(WeightsError) as caught:
        build_backbone(spec_of(family, weights=str(path)))
    assert str(path) in str(caught.value) and "shape mismatches" in str(caught.value)


@pytest.mark.parametrize("family", list(NARROW))
def test_missing_file_is_a_clear_error(family, tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(WeightsError, match=f"{path}.*does not exist"):
        build_backbone(spec_of(family, weights=str(path)))


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=str(path)):
        build_backbone(spec_of("dinov2", weights=str(path)))


# ----------------------------------------------------------------------------- hub cache (offline)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_file(cache_dir: Path, repo_id: str, filename: str, state: dict, commit: str = COMMIT) -> Path:
    """Lay out one file the way huggingface_hub caches it (snapshots/<commit>/..., refs/main)."""
    repo = cache_dir.resolve() / "huggingface" / "hub" / ("models--" + repo_id.replace("/", "--"))
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return path


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_timm_pretrained_loads_offline_from_the_cache(family, random_backbones, tmp_path):
    original = random_backbones[family]
    spec = spec_of(family, weights="pretrained")
    fake_hub_file(tmp_path, f"timm/{spec['model']}", "model.safetensors", source_state_dict(original))
    with hub_environment(tmp_path, offline=True):
        assert hub_settings().offline
        loaded = build_backbone(spec)
        pinned = build_backbone({**spec, "revision": COMMIT})
    assert loaded.identity == f"timm:{spec['model']}|hf:timm/{spec['model']}@{COMMIT}/model.safetensors"
    assert pinned.identity == loaded.identity
    x = images(family)
    with torch.no_grad():
        assert torch.equal(original(x).grid, loaded(x).grid)


def test_openclip_pretrained_loads_offline_from_the_cache(random_backbones, tmp_path):
    """open_clip's own loader on a full CLIP checkpoint from the cache; the visual tower is kept."""
    import open_clip

    from em_foundation.backbones.openclip import model_config

    small_text = {"width": 32, "heads": 2, "layers": 1, "vocab_size": 100, "context_length": 8}
    spec = spec_of(
        "openclip",
        weights="pretrained",
        options={"pretrained_tag": "laion2b_s34b_b88k"},
        model_kwargs={**NARROW["openclip"]["model_kwargs"], "text_cfg": small_text},
    )
    cfg = model_config(spec)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    original = random_backbones["openclip"]
    state = {k: v.clone().contiguous() for k, v in clip.state_dict().items()}
    state.update({f"visual.{k}": v for k, v in source_state_dict(original).items()})
    fake_hub_file(tmp_path, "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors", state)
    with hub_environment(tmp_path, offline=True):
        loaded = build_backbone(spec)
    assert loaded.identity.endswith(f"hf:laion/CLIP-ViT-B-16-laion2B-s34B-b88K@{COMMIT}/open_clip_model.safetensors")
    assert not hasattr(loaded.model, "text") and loaded.model.proj is None
    x = images("openclip")
    with torch.no_grad():
        torch.testing.assert_close(original(x).grid, loaded(x).grid)


@pytest.mark.parametrize("family", ["dinov2", "openclip"])
def test_offline_without_fetched_weights_says_run_fetch_weights(family, tmp_path):
    spec = spec_of(family, weights="pretrained")
    if family == "openclip":
        spec["options"] = {"pretrained_tag": "laion2b_s34b_b88k"}
    with hub_environment(tmp_path, offline=True), pytest.raises(WeightsError, match="fetch_weights"):
        build_backbone(spec)


@pytest.mark.parametrize("family", ["dinov2", "openclip"])
def test_pinned_weights_from_another_revision_fail_offline(family, tmp_path):
    """A cache holding only another commit does not satisfy a pinned revision."""
    spec = spec_of(family, weights="pretrained", revision="f" * 40)
    if family == "openclip":
        spec["options"] = {"pretrained_tag": "laion2b_s34b_b88k"}
        repo, name = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"
    else:
        repo, name = f"timm/{spec['model']}", "model.safetensors"
    fake_hub_file(tmp_path, repo, name, {"x": torch.zeros(1)})
    with hub_environment(tmp_path, offline=True), pytest.raises(WeightsError, match="not in the weights cache"):
        build_backbone(spec)


def test_hub_environment_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", "/somewhere/else")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with hub_environment(tmp_path, offline=True) as cache:
        settings = hub_settings()
        assert settings.hub_cache == cache / "huggingface" / "hub" and settings.offline
        assert settings.torch_home == cache / "torch"
    with hub_environment(tmp_path, offline=False):
        assert not hub_settings().offline
    import os

    assert os.environ["HF_HOME"] == "/somewhere/else" and "HF_HUB_OFFLINE" not in os.environ


# ----------------------------------------------------------------------------- fetch_weights


def test_fetch_weights_random_and_file(tmp_path):
    record = fetch_weights(spec_of("dinov2"), tmp_path / "cache")
    assert record["source"] == "random" and record["files"] == []
    assert not (tmp_path / "cache").exists()  # nothing downloaded, nothing created
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    record = fetch_weights(spec_of("openclip", weights=str(path)), tmp_path / "cache")
    assert record["source"] == "file" and record["files"][0]["sha256"] == file_sha256(path)
    with pytest.raises(WeightsError, match="does not exist"):
        fetch_weights(spec_of("dinov3", weights=str(tmp_path / "missing.pt")), tmp_path / "cache")
    assert fetch_weights({"family": "filterbank"}, tmp_path / "cache")["source"] == "none"


@pytest.mark.parametrize("family", ["dinov2", "openclip"])
def test_fetch_weights_pinned_revision_records_commit_and_sha256(family, random_backbones, tmp_path):
    """A pinned commit already in the cache resolves without the network (as after a fetch)."""
    spec = spec_of(family, weights="pretrained", revision=COMMIT)
    if family == "openclip":
        spec["options"] = {"pretrained_tag": "laion2b_s34b_b88k"}
        repo, name = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"
    else:
        repo, name = f"timm/{spec['model']}", "model.safetensors"
    path = fake_hub_file(tmp_path, repo, name, source_state_dict(random_backbones[family]))
    record = fetch_weights(spec, tmp_path)
    assert record["source"] == "hub" and record["repo_id"] == repo
    assert record["revision_resolved"] == COMMIT and record["revision_requested"] == COMMIT
    assert record["files"] == [
        {"name": name, "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    ]
    assert record["identity"] == f"hf:{repo}@{COMMIT}/{name}"


def test_fetch_weights_script_writes_the_marker(tmp_path):
    output = tmp_path / "resources" / "weights" / "dinov2S.json"
    log = tmp_path / "logs" / "fetch.log"
    snakemake = types.SimpleNamespace(
        params=types.SimpleNamespace(
            backbone=spec_of("dinov2"), hub={"cache_dir": str(tmp_path / "resources" / "weights")}
        ),
        output=[str(output)],
        log=[str(log)],
        wildcards=types.SimpleNamespace(backbone="dinov2S"),
    )
    runpy.run_path(str(REPO / "scripts" / "fetch_weights.py"), init_globals={"snakemake": snakemake})
    marker = json.loads(output.read_text())
    assert marker["backbone"] == "dinov2S" and marker["source"] == "random"
    assert "dinov2S" in log.read_text()
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary left behind
    assert len((REPO / "scripts" / "fetch_weights.py").read_text().splitlines()) < 25
