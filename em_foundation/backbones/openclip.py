"""OpenCLIP vision transformers (visual tower only) through open_clip_torch.

Config convention (one backbone entry)::

    openclipL:
      family: openclip
      model: ViT-L-14                     # an open_clip built-in model name
      options: {pretrained_tag: laion2b_s32b_b82k}
      pooling: cls                        # the study's image embedding for OpenCLIP

``model`` is the architecture and ``options.pretrained_tag`` the weights, as in
``open_clip.create_model(model, pretrained=tag)``; the tag never goes into ``model`` (a
``/`` there would be read by open_clip as part of the name and hides the patch size).
``model_kwargs`` override fields of the model's ``vision_cfg`` (``width``, ``layers``,
``head_width``, ``patch_size``, ``image_size``, ``mlp_ratio``, ...); the top-level keys
``embed_dim`` (CLIP projection size, unused here) and ``quick_gelu`` go to the model config
itself, and a ``text_cfg`` dict is merged into the text tower's config (only built, then
discarded, when open_clip loads a full pretrained checkpoint; tests make it small).

Normalisation ``family`` means the constants the checkpoint was trained with, as
open_clip's registry records them for the tag (``laion2b_s32b_b82k``, the study's
ViT-L-14, was trained with Inception's 0.5/0.5, not OpenAI CLIP's constants); without a
tag, OpenAI CLIP's constants. ``imagenet`` reproduces the published (mismatched) choice.

Implementation notes:

* The attention of each block (``nn.MultiheadAttention``) is converted, after the
  weights are loaded, to ``SplitAttention`` whose input projection (``qkv``) and output
  projection (``proj``) are plain ``nn.Linear`` modules sharing the loaded parameters. LoRA
  then hooks both with peft's ordinary ``Linear`` adapter, exactly as for timm's ViTs,
  instead of peft's MultiheadAttention adapter, which merges the adapter into the frozen
  weight before every forward and subtracts it again after (base weights drift by rounding,
  parameters re-registered every call).
* open_clip's ViT adds a fixed-size positional embedding; this module's forward
  interpolates its grid part (bicubic, as open_clip's own ``resize_pos_embed``) to the
  input's token grid, so any multiple of the patch size is accepted.
* The CLIP projection (``visual.proj``) is not used for features and is removed, so it
  is neither counted nor trained.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from em_foundation.backbones.base import Backbone, BackboneOutput, normalisation_constants, seeded_init
from em_foundation.backbones.checkpoint import WeightsError, load_state_dict_file, load_weights_strict, require_file
from em_foundation.backbones.hub import HubSource, resolve_pretrained
from em_foundation.backbones.timm_vit import check_patch_size, resolve_layers
from em_foundation.families import FAMILIES
from em_foundation.io import file_sha256

# model_kwargs that belong to the model config, not to its vision_cfg.
TOP_LEVEL_KWARGS = ("embed_dim", "quick_gelu", "text_cfg")
# Keys of a visual-tower state dict that this backbone does not use (the CLIP projection).
UNUSED_KEYS = ("proj",)


def _model_name(spec: dict[str, Any]) -> str:
    name = spec.get("model") or FAMILIES["openclip"].default_model
    if "/" in name or ":" in name:
        raise ValueError(
            f"openclip model {name!r}: give an open_clip built-in name (e.g. ViT-L-14) in `model` and the "
            "weights as options.pretrained_tag (e.g. laion2b_s32b_b82k)"
        )
    return name


def _tag(spec: dict[str, Any]) -> str | None:
    return (spec.get("options") or {}).get("pretrained_tag")


def tag_config(spec: dict[str, Any]) -> dict[str, Any]:
    """open_clip's registry entry for (model, pretrained_tag); {} without a tag."""
    import open_clip

    tag = _tag(spec)
    if not tag:
        return {}
    name = _model_name(spec)
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(
            f"open_clip has no pretrained tag {tag!r} for {name}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(name)}"
        )
    return cfg


def model_config(spec: dict[str, Any]) -> dict[str, Any]:
    """open_clip's model config for ``spec['model']`` with ``model_kwargs`` applied."""
    import open_clip

    name = _model_name(spec)
    base = open_clip.get_model_config(name)
    if base is None:
        raise ValueError(f"open_clip has no model {name!r}; built-in models: {open_clip.list_models()}")
    cfg = copy.deepcopy(base)
    for key, value in (spec.get("model_kwargs") or {}).items():
        if key in ("text_cfg", "vision_cfg") and isinstance(value, dict):
            cfg[key].update(value)
        elif key in TOP_LEVEL_KWARGS:
            cfg[key] = value
        else:
            cfg["vision_cfg"][key] = value
    if tag_config(spec).get("quick_gelu"):
        cfg["quick_gelu"] = True  # what open_clip trained such tags with (e.g. 'openai')
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(f"openclip model {name!r} is not a plain ViT (timm tower or ResNet); not supported")
    return cfg


def hub_source(spec: dict[str, Any]) -> HubSource:
    """Where open_clip publishes (model, pretrained_tag)'s checkpoint."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    name = _model_name(spec)
    tag = _tag(spec)
    if not tag:
        raise WeightsError(
            f"openclip {name} with weights: pretrained needs options.pretrained_tag (e.g. laion2b_s32b_b82k)"
        )
    cfg = tag_config(spec)
    label = f"{name}/{tag}"
    if cfg.get("hf_hub"):
        # 'org/repo/' (default file name) or 'org/repo/file.pt', as open_clip's download_pretrained
        repo_id, filename = os.path.split(cfg["hf_hub"])
        if not filename or filename == HF_WEIGHTS_NAME:
            names: tuple[str, ...] = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        else:
            names = (filename,)
        return HubSource(repo_id=repo_id, filenames=names, label=label)
    if cfg.get("url"):
        return HubSource(repo_id=None, url=cfg["url"], label=label)
    raise WeightsError(f"open_clip lists no download for {label}")


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first) with ``nn.Linear`` projections.

    ``qkv`` and ``proj`` share the parameters of the module it replaces, so the features
    are those of open_clip's block (to float rounding) and LoRA can adapt both
    projections with ordinary Linear adapters. Call signature and return value follow
    ``nn.MultiheadAttention`` as open_clip's ``ResidualAttentionBlock`` calls it.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
            raise ValueError("only batch-first self-attention without bias_k/v or zero-attention is supported")
        width = mha.embed_dim
        weight = mha.in_proj_weight
        self.num_heads = mha.num_heads
        self.dropout = float(mha.dropout)
        self.qkv = nn.Linear(width, 3 * width, bias=mha.in_proj_bias is not None, device="meta")
        self.qkv.weight = weight
        if mha.in_proj_bias is not None:
            self.qkv.bias = mha.in_proj_bias
        self.proj = nn.Linear(width, width, bias=mha.out_proj.bias is not None, device="meta")
        self.proj.weight = mha.out_proj.weight
        if mha.out_proj.bias is not None:
            self.proj.bias = mha.out_proj.bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("SplitAttention is self-attention only")
        if need_weights or attn_mask is not None:
            raise NotImplementedError("SplitAttention supports neither attention weights nor masks")
        batch, length, width = query.shape
        q, k, v = (
            self.qkv(query).reshape(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(batch, length, width)), None


def split_attention(visual: nn.Module) -> None:
    """Replace every block's ``nn.MultiheadAttention`` by ``SplitAttention`` (in place)."""
    for block in visual.transformer.resblocks:
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise ValueError(
                f"openclip block attention is {type(block.attn).__name__}; only nn.MultiheadAttention blocks "
                "(the standard OpenCLIP ViTs) are supported"
            )
        block.attn = SplitAttention(block.attn)


def to_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A converted tower's state dict in open_clip's visual-tower key names (for export)."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"\.attn\.qkv\.(weight|bias)$", r".attn.in_proj_\1", key)
        key = re.sub(r"\.attn\.proj\.(weight|bias)$", r".attn.out_proj.\1", key)
        renamed[key] = value
    return renamed


def visual_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower's part of a checkpoint, in open_clip's key names.

    A full CLIP checkpoint gives its ``visual.*`` keys (text tower and logit scale
    dropped); a visual-tower file is taken as it is. The unused CLIP projection is dropped
    either way, and this backbone's own names (``attn.qkv``/``attn.proj``, as
    ``backbone.model.state_dict()`` has them) are mapped back to open_clip's.
    """
    if any(key.startswith("visual.") for key in state):
        state = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    return {key: value for key, value in to_open_clip_state_dict(state).items() if key not in UNUSED_KEYS}


def build_visual(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip visual tower as open_clip builds it (no conversion)."""
    from open_clip.model import _build_vision_tower

    cfg = model_config(spec)
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=bool(cfg.get("quick_gelu", False)))


class OpenClipViT(Backbone):
    """OpenCLIP's ViT image tower: patch tokens of chosen blocks as a (C, H/p, W/p) grid."""

    def __init__(self, spec: dict[str, Any]) -> None:
        name = _model_name(spec)
        tag = _tag(spec)
        trained = tag_config(spec)
        family = FAMILIES["openclip"]
        own_mean, own_std = tuple(trained.get("mean") or family.mean), tuple(trained.get("std") or family.std)
        mean, std = normalisation_constants(spec.get("normalisation"), own_mean, own_std)
        super().__init__(mean, std)
        self.family = "openclip"
        weights = spec.get("weights") or "pretrained"
        kwargs = dict(spec.get("model_kwargs") or {})
        if weights == "random":
            init_seed = int((spec.get("options") or {}).get("init_seed", 0))
            with seeded_init(init_seed):
                visual = build_visual(spec)
            self.identity = f"random-init:{name}:tag={tag}:seed={init_seed}:{sorted(kwargs.items())}"
        elif weights == "pretrained":
            visual = self._pretrained_visual(spec, name, tag, kwargs)
        else:
            path = require_file(Path(weights))
            self.identity = f"file:{path.name}:sha256={file_sha256(path)}"
            visual = build_visual(spec)
            visual.proj = None
            load_weights_strict(visual, visual_state_dict(load_state_dict_file(path)), path)
        visual.proj = None
        visual.patch_dropout = nn.Identity()  # a training augmentation that would break the grid
        split_attention(visual)
        self.model = visual
        self.patch_size = int(visual.patch_size[0])
        check_patch_size(spec, self.patch_size)
        self.layers = list(spec.get("layers") or [-1])
        self.block_indices = resolve_layers(self.layers, len(visual.transformer.resblocks))
        self.embed_dim = int(visual.transformer.width) * len(self.block_indices)
        self.pooling = spec.get("pooling") or "mean"

    def _pretrained_visual(self, spec: dict[str, Any], name: str, tag: str | None, kwargs: dict[str, Any]) -> nn.Module:
        import open_clip

        resolved = resolve_pretrained(spec, hub_source(spec))
        self.identity = f"open_clip:{name}/{tag}|{resolved.identity}"
        cfg = model_config(spec)
        overrides = (
            {"vision_cfg": cfg["vision_cfg"], **{k: cfg[k] for k in TOP_LEVEL_KWARGS if k in cfg}} if kwargs else {}
        )
        try:
            # open_clip's own loader (strict, with its checkpoint conversions) on the cached file.
            model = open_clip.create_model(
                name, pretrained=str(resolved.path), force_quick_gelu=bool(cfg.get("quick_gelu")), **overrides
            )
        except RuntimeError as error:
            raise WeightsError(
                f"weights file {resolved.path} does not fit open_clip {name}: {str(error)[:1500]}"
            ) from error
        return model.visual

    def _positional_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1 + h*w, C): the class position and the patch grid's, resized to (h, w)."""
        pos = self.model.positional_embedding
        grid_h, grid_w = self.model.grid_size
        if (height, width) == (grid_h, grid_w):
            return pos
        grid = pos[1:].reshape(1, grid_h, grid_w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(height * width, -1).to(pos.dtype)
        return torch.cat([pos[:1], grid], dim=0)

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x = self.normalise(images)
        visual = self.model
        batch = x.shape[0]
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = self._positional_embedding(height, width).to(x.dtype)
        cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(batch, 1, -1)
        x = visual.ln_pre(torch.cat([cls, x + pos[1:]], dim=1))
        grids, classes = [], []
        take = set(self.block_indices)
        for index, block in enumerate(visual.transformer.resblocks[: max(take) + 1]):
            x = block(x)
            if index in take:
                # The final LayerNorm on every chosen block, as timm's norm=True does.
                tokens = visual.ln_post(x)
                classes.append(tokens[:, 0])
                grids.append(tokens[:, 1:].transpose(1, 2).reshape(batch, -1, height, width))
        grid = torch.cat(grids, dim=1)
        pooled = torch.cat(classes, dim=1) if self.pooling == "cls" else grid.mean(dim=(2, 3))
        return BackboneOutput(grid=grid, pooled=pooled)


def build(spec: dict[str, Any]) -> Backbone:
    """Builder of the openclip family (em_foundation.families)."""
    return OpenClipViT(spec)


__all__ = [
    "OpenClipViT",
    "SplitAttention",
    "build_visual",
    "model_config",
    "hub_source",
    "split_attention",
    "tag_config",
    "to_open_clip_state_dict",
    "visual_state_dict",
]
