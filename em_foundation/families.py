"""Backbone families: every fact about a family, declared once, importable without torch.

A config entry's ``family`` names a row of ``FAMILIES``; the grid (which regimes run), the
config checks (which families exist), weight fetching (where the hub weights live), the
segmenter (which tokens are standardised), LoRA (which modules get adapters) and the
parameter table all read this table instead of keeping their own lists. The model is timm's
registry with its per-model ``pretrained_cfg``: a name maps to a builder and a record of
defaults.

Adding a family: one ``Family`` row here and one builder module (a ``build(spec)`` function
returning a ``Backbone``, and, for hub weights, a ``hub_source(spec)`` function). A family
whose builder returns a whole segmenter (``segmenter=True``: ``(images, out_size) -> logits``,
the U-Net) has no token grid: it runs no cached regime and gets no domain analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenCLIP was trained with OpenAI CLIP's constants; feeding it ImageNet's (as the
# published pipeline did) shifts every input it sees.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IDENTITY_MEAN = (0.0, 0.0, 0.0)
IDENTITY_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Family:
    """One backbone family: how to build it and the defaults the workflow plans with."""

    name: str
    builder: str  # "module:function" in em_foundation.backbones: config entry in, Backbone out
    default_patch: int  # tokens per side when neither the model name nor overrides say
    regimes: tuple[str, ...]  # regimes that make sense for it (others are dropped from the grid)
    mean: tuple[float, ...]  # normalisation constants the weights were trained with ("family")
    std: tuple[float, ...]
    hub: str | None = None  # "module:function" in em_foundation.backbones giving a spec's HubSource; None: no weights
    lora_targets: str | None = None  # regex over module names that LoRA adapts; None: no LoRA
    default_model: str | None = None  # architecture when the config entry names none
    standardise_tokens: bool = False  # head sees tokens standardised with training-set statistics
    # its tokens are per-pixel features pooled to patches: a per-pixel regime (pixelforest)
    # computes them itself at full resolution and reads no cache
    pooled_pixel_features: bool = False
    # keys the builder reads from ``backbones.<name>.options`` and their types: the config
    # check at start-up names any other key (a typo is otherwise silently ignored)
    options: dict[str, type] = field(default_factory=dict)
    # the builder returns a complete segmenter, not a Backbone: no patch tokens, so no feature
    # cache, no domain analysis, and training.build_segmenter adds no head
    segmenter: bool = False
    # dtype of its cached tokens: float16 halves a ViT cache (layer-normalised tokens lose
    # nothing); responses spanning orders of magnitude (the filter bank's structure-tensor
    # channels have sd about 1e-6) keep float32, where float16 would make them subnormal.
    token_dtype: str = "float16"
    note: str = ""


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="filterbank",
            builder="filterbank:build",
            default_patch=8,
            # Hand-crafted filters have nothing to adapt: only the learners on top train.
            regimes=("head", "forest", "pixelforest"),
            # Pixels in [0, 1] as they come (no 3-channel ImageNet constants).
            mean=IDENTITY_MEAN,
            std=IDENTITY_STD,
            # Channels differ in scale by up to 10^4 (raw intensity against structure-tensor
            # eigenvalues); fed raw, the head's BatchNorm behaves very differently in training
            # and evaluation mode. ViT tokens are layer-normalised and reach the head untouched.
            standardise_tokens=True,
            pooled_pixel_features=True,
            options={"sigmas": list, "patch_size": int},
            token_dtype="float32",
            note="a 4-scale Gaussian-derivative filter bank in ilastik's style (no DoG), pooled to a patch grid",
        ),
        # DINOv2 and DINOv3 through timm: ImageNet constants, the same builder, hub source and
        # LoRA targets (each block's fused qkv and attention output projection; the same module
        # names in timm's VisionTransformer and Eva classes).
        *(
            Family(
                name=name,
                builder="timm_vit:build",
                default_patch=patch,
                regimes=("head", "lora", "fullft", "forest", "pixelforest"),
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                hub="timm_vit:hub_source",
                lora_targets=r".*blocks\.\d+\.attn\.(qkv|proj)",
                default_model=model,
                options={"init_seed": int},
            )
            for name, patch, model in (
                ("dinov2", 14, "vit_large_patch14_dinov2.lvd142m"),
                ("dinov3", 16, "vit_large_patch16_dinov3.lvd1689m"),
            )
        ),
        Family(
            name="openclip",
            builder="openclip:build",
            default_patch=14,
            regimes=("head", "lora", "fullft", "forest", "pixelforest"),
            # Without a pretrained tag; with one, the builder uses the tag's own constants
            # from open_clip's registry (ViT-L-14 laion2b_s32b_b82k: 0.5 / 0.5).
            mean=CLIP_MEAN,
            std=CLIP_STD,
            hub="openclip:hub_source",
            # Attention input and output projections after SplitAttention made them Linear.
            lora_targets=r".*resblocks\.\d+\.attn\.(qkv|proj)",
            default_model="ViT-L-14",
            options={"pretrained_tag": str, "init_seed": int},
        ),
        Family(
            name="sam",
            builder="sam:build",
            default_patch=16,
            regimes=("head", "lora", "fullft", "forest", "pixelforest"),
            # SAM's pixel mean/std on the 0-255 scale are ImageNet's constants x 255: on
            # [0, 1] inputs its own normalisation is ImageNet's (backbones/sam.SAM_PIXEL_MEAN).
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            # SAM's weights from timm's hub, or micro-sam's EM models (options.micro_sam) from
            # the URL and xxh128 checksum micro-sam's registry publishes.
            hub="sam:hub_source",
            lora_targets=r".*blocks\.\d+\.attn\.(qkv|proj)",
            default_model="samvit_base_patch16.sa1b",
            options={"init_seed": int, "features": str, "micro_sam": str, "input": str},
            note=(
                "SAM ViT-B/L/H image encoders (timm samvit_*_patch16) and micro-sam's EM-organelles models of the "
                "same architectures; features after the neck by default"
            ),
        ),
        Family(
            name="sam2",
            builder="sam2:build",
            default_patch=16,
            regimes=("head", "lora", "fullft", "forest", "pixelforest"),
            # SAM2 normalises [0, 1] pixels with ImageNet's constants.
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            hub="sam2:hub_source",
            # Hiera's MultiScaleAttention: fused qkv and output proj (the block's own stage-change
            # ``blocks.N.proj`` is not attention and is not matched).
            lora_targets=r".*blocks\.\d+\.attn\.(qkv|proj)",
            default_model="sam2_hiera_base_plus.fb_r896",
            options={"init_seed": int},
            note=(
                "SAM2's Hiera trunk (timm sam2_hiera_*): the stride-16 stage is the patch grid, the stride-32 stage "
                "is dropped; inputs padded to a multiple of 32 and the grid cropped back"
            ),
        ),
        Family(
            name="unet",
            builder="unet:build",
            # Tile views are planned with this multiple (the resize views of patch-16 families
            # are shared); the U-Net pads its input to its own stride 2**encoder_depth and crops back.
            default_patch=16,
            regimes=("supervised",),
            # Grey replicated to 3 channels with ImageNet's constants: what the ImageNet encoder
            # weights were trained with; from scratch it is a fixed affine map BatchNorm absorbs.
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            hub="unet:hub_source",
            segmenter=True,
            options={"encoder": str, "encoder_depth": int, "decoder_channels": list},
            note="2-D U-Net of segmentation-models-pytorch (ResNet encoders), every parameter trained from tiles",
        ),
    )
}


def family_of(name: str) -> Family:
    """The row of ``name``, or an error that lists the families there are."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown backbone family {name!r}; families: {', '.join(FAMILIES)}") from None


# Views of the table for callers that want a plain mapping.
FAMILY_REGIMES: dict[str, tuple[str, ...]] = {name: family.regimes for name, family in FAMILIES.items()}
FAMILY_OPTIONS: dict[str, dict[str, type]] = {name: family.options for name, family in FAMILIES.items()}
FAMILY_DEFAULT_PATCH: dict[str, int] = {name: family.default_patch for name, family in FAMILIES.items()}
HUB_FAMILIES: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if family.hub)
SEGMENTER_FAMILIES: frozenset[str] = frozenset(name for name, family in FAMILIES.items() if family.segmenter)
STANDARDISED_FAMILIES: frozenset[str] = frozenset(
    name for name, family in FAMILIES.items() if family.standardise_tokens
)
