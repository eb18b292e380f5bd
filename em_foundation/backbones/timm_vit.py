"""DINOv2 and DINOv3 vision transformers through timm.

timm's ``forward_intermediates`` returns per-block patch-token grids with the prefix
tokens split off: the class token and, for the ``_reg4_`` DINOv2 variants and every
DINOv3 model (timm's ``Eva`` class, 4 storage tokens), the register tokens. This module
chooses blocks, weights and normalisation.

Weights (``weights`` in the config entry):

* ``pretrained``: timm's published checkpoint (``BACKBONE_PRESETS`` lists the sizes), read
  from the hub cache that ``fetch_weights`` filled (offline on compute nodes), pinned to
  ``revision`` when given; timm's own pretrained loader loads it.
* ``random``: seeded random initialisation (``options.init_seed``, default 0).
* a path: a state dict (``.safetensors`` or a torch file) in timm's names or an upstream
  layout timm converts (Meta's DINOv2 and DINOv3 releases), through timm's own
  ``checkpoint_filter_fn``; then every key is checked and mismatches are named.

Normalisation (``family``): the weights' own mean/std from timm's ``pretrained_cfg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from em_foundation.backbones.base import Backbone, BackboneOutput, FamilyBackbone, seeded_init
from em_foundation.backbones.checkpoint import WeightsError, load_converted, load_state_dict_file, require_file
from em_foundation.backbones.hub import HubSource, resolve_pretrained
from em_foundation.families import family_of
from em_foundation.io import file_sha256

# The published sizes, as config entries (``family`` + ``model`` [+ ``options``]). The
# study used the three Large models; the others are the options users asked for.
# DINOv2 g/14 is ViT-g (1.1 B parameters); DINOv3's largest distilled ViT in timm is H+/16
# (840 M). The ``_reg4_`` DINOv2 models carry 4 register tokens (dropped from the grid).
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "dinov2_s": {"family": "dinov2", "model": "vit_small_patch14_dinov2.lvd142m"},
    "dinov2_b": {"family": "dinov2", "model": "vit_base_patch14_dinov2.lvd142m"},
    "dinov2_l": {"family": "dinov2", "model": "vit_large_patch14_dinov2.lvd142m"},  # published
    "dinov2_g": {"family": "dinov2", "model": "vit_giant_patch14_dinov2.lvd142m"},
    "dinov2_s_reg4": {"family": "dinov2", "model": "vit_small_patch14_reg4_dinov2.lvd142m"},
    "dinov2_b_reg4": {"family": "dinov2", "model": "vit_base_patch14_reg4_dinov2.lvd142m"},
    "dinov2_l_reg4": {"family": "dinov2", "model": "vit_large_patch14_reg4_dinov2.lvd142m"},
    "dinov2_g_reg4": {"family": "dinov2", "model": "vit_giant_patch14_reg4_dinov2.lvd142m"},
    "dinov3_s": {"family": "dinov3", "model": "vit_small_patch16_dinov3.lvd1689m"},
    "dinov3_b": {"family": "dinov3", "model": "vit_base_patch16_dinov3.lvd1689m"},
    "dinov3_l": {"family": "dinov3", "model": "vit_large_patch16_dinov3.lvd1689m"},  # published
    "dinov3_hplus": {"family": "dinov3", "model": "vit_huge_plus_patch16_dinov3.lvd1689m"},
    "openclip_b": {
        "family": "openclip",
        "model": "ViT-B-16",
        "options": {"pretrained_tag": "laion2b_s34b_b88k"},
        "pooling": "cls",
    },
    "openclip_l": {
        "family": "openclip",
        "model": "ViT-L-14",
        "options": {"pretrained_tag": "laion2b_s32b_b82k"},
        "pooling": "cls",
    },  # published
    "openclip_h": {
        "family": "openclip",
        "model": "ViT-H-14",
        "options": {"pretrained_tag": "laion2b_s32b_b79k"},
        "pooling": "cls",
    },
}


def resolve_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Config block indices (negative from the end) to absolute, ascending indices.

    Features are concatenated in ascending block order (what timm's
    ``forward_intermediates`` returns, whatever order the config lists them in).
    Duplicates and indices outside the model are errors, because they would make
    ``embed_dim`` disagree with the grid.
    """
    absolute = []
    for index in layers:
        resolved = depth + int(index) if int(index) < 0 else int(index)
        if not 0 <= resolved < depth:
            raise ValueError(f"layers: block {index} is outside the model's {depth} blocks")
        absolute.append(resolved)
    if len(set(absolute)) != len(absolute):
        raise ValueError(f"layers: {list(layers)} names the same block twice (depth {depth})")
    return sorted(absolute)


def check_patch_size(spec: dict[str, Any], patch_size: int) -> None:
    """The workflow plans tiles from the config's name (grid.patch_size_of); it must agree."""
    from em_foundation.grid import patch_size_of

    planned = patch_size_of(spec)
    if planned != patch_size:
        raise ValueError(
            f"model {spec.get('model')!r} has patch size {patch_size}, but the workflow reads {planned} from "
            "its config entry; set model_kwargs.patch_size to the true value"
        )


def timm_hub_source(name: str, known: str) -> HubSource:
    """The hub repository timm loads ``name``'s pretrained weights from; ``known`` lists the published ones."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # older timm raise on unknown names, newer return None
        cfg = None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        raise WeightsError(f"timm has no hub weights for {name!r}; {known}")
    # timm's own order when the config names no file: the safetensors alternative first
    filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    # timm pins some weights as "<repo>@<revision>" (its own hub loader splits it the same way)
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    return HubSource(repo_id=repo_id, filenames=filenames, label=name, revision=revision or None)


def timm_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std timm's ``pretrained_cfg`` gives ``name``'s weights (None: timm has no record).

    The weights' own constants: DINOv3's satellite model ``.sat493m`` was trained with
    (0.430, 0.411, 0.296) / (0.213, 0.156, 0.143), not ImageNet's.
    """
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # older timm raise on unknown names, newer return None
        cfg = None
    if cfg is None or not getattr(cfg, "mean", None) or not getattr(cfg, "std", None):
        return None
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    return (mean, std) if len(mean) == len(std) == 3 else None


def classifier_keys(model: torch.nn.Module) -> Callable[[str], bool]:
    """Keys of the classifier timm builds the model without (``num_classes=0``): ignored, as timm's loader does."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    prefixes = tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))
    own = set(model.state_dict())
    return lambda key: key.startswith(prefixes) and key not in own


def hub_source(spec: dict[str, Any]) -> HubSource:
    """The hub repository timm loads ``spec['model']``'s pretrained weights from."""
    published = [p["model"] for p in BACKBONE_PRESETS.values() if p["family"] != "openclip"]
    return timm_hub_source(
        spec.get("model") or family_of(spec["family"]).default_model, "published DINO models: " + ", ".join(published)
    )


@dataclass(frozen=True)
class TimmWeights:
    """A timm backbone's weights, resolved once: what ``timm.create_model`` needs, and the identity.

    ``timm_file``: a hub file for timm's own loader (its key filters apply); ``file``: a
    checkpoint the family loads strictly after creation; ``init_seed``: random weights.
    """

    identity: str
    init_seed: int | None = None
    timm_file: str | None = None
    file: Path | None = None


def resolve_timm_weights(spec: dict[str, Any], name: str, source: Callable[[dict[str, Any]], HubSource]) -> TimmWeights:
    """``weights: random | pretrained | <file>`` of a config entry, for the timm families."""
    weights = spec.get("weights") or "pretrained"
    if weights == "random":
        init_seed = int((spec.get("options") or {}).get("init_seed", 0))
        kwargs = sorted((spec.get("model_kwargs") or {}).items())
        return TimmWeights(f"random-init:{name}:seed={init_seed}:{kwargs}", init_seed=init_seed)
    if weights == "pretrained":
        resolved = resolve_pretrained(spec, source(spec))
        # timm's loader, on exactly the file whose commit goes into the identity.
        return TimmWeights(f"timm:{name}|{resolved.identity}", timm_file=str(resolved.path))
    path = require_file(Path(weights))
    return TimmWeights(f"file:{path.name}:sha256={file_sha256(path)}", file=path)


def create_timm_model(name: str, weights: TimmWeights, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` without a classifier, seeded apart from the run's RNG, with hub weights named on failure."""
    import timm

    try:
        with seeded_init(weights.init_seed):
            return timm.create_model(
                name,
                pretrained=weights.timm_file is not None,
                pretrained_cfg_overlay={"file": weights.timm_file} if weights.timm_file else None,
                num_classes=0,
                **kwargs,
            )
    except RuntimeError as error:
        if weights.timm_file is None:
            raise
        raise WeightsError(
            f"weights file {weights.timm_file} does not fit {name} ({sorted(kwargs.items())}): {str(error)[:1500]}"
        ) from error


class TimmViT(FamilyBackbone):
    """A timm ViT returning the patch tokens of chosen blocks as a (C, H/p, W/p) grid."""

    def __init__(self, spec: dict[str, Any]) -> None:
        # "family" normalisation is the weights' own, from timm's pretrained_cfg (ImageNet's
        # for the LVD DINO models, the satellite constants for DINOv3 .sat493m).
        name = spec.get("model") or family_of(spec["family"]).default_model
        super().__init__(spec, timm_normalisation(name))
        resolved = resolve_timm_weights(spec, name, hub_source)
        self.identity = resolved.identity
        kwargs = dict(spec.get("model_kwargs") or {})
        self.model = create_timm_model(name, resolved, dynamic_img_size=True, **kwargs)
        if resolved.file is not None:
            # Meta's own DINOv2/DINOv3 files and timm's: timm's conversion, then a strict check
            load_converted(
                self.model, load_state_dict_file(resolved.file), resolved.file, ignored=classifier_keys(self.model)
            )
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        check_patch_size(spec, self.patch_size)
        self.layers = list(spec.get("layers") or [-1])
        self.block_indices = resolve_layers(self.layers, len(self.model.blocks))
        self.embed_dim = int(self.model.embed_dim) * len(self.block_indices)
        self.pooling = spec.get("pooling") or "mean"

    def prepare_lora(self) -> None:
        """Route every qkv projection through its module's forward, where LoRA hooks in.

        timm's Eva attention with a q/v bias (the ``_qkvb`` DINOv3 models) calls
        ``F.linear(x, self.qkv.weight, bias)``, which would bypass an adapter on ``qkv``
        silently. ``qkv_bias_separate`` computes the same ``x W^T + b`` via ``self.qkv(x)``.
        """
        for module in self.model.modules():
            if hasattr(module, "qkv_bias_separate") and getattr(module, "q_bias", None) is not None:
                module.qkv_bias_separate = True

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x = self.normalise(images)
        grids, prefixes = zip(
            *self.model.forward_intermediates(
                x, indices=self.block_indices, return_prefix_tokens=True, norm=True, intermediates_only=True
            )
        )
        grid = torch.cat(grids, dim=1)
        if self.pooling == "cls":
            pooled = torch.cat([prefix[:, 0] for prefix in prefixes], dim=1)
        else:
            pooled = grid.mean(dim=(2, 3))
        return BackboneOutput(grid=grid, pooled=pooled)


def build(spec: dict[str, Any]) -> Backbone:
    """Builder of the dinov2 and dinov3 families (em_foundation.families)."""
    return TimmViT(spec)
