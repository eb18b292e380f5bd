"""Segment Anything (SAM) image encoders, general and EM-pretrained (micro-sam), through timm.

timm's ``VisionTransformerSAM`` (``samvit_{base,large,huge}_patch16``) is the SAM image
encoder with segment-anything's parameter names up to two renames, and its
``checkpoint_filter_fn`` maps a segment-anything checkpoint onto it: keep the
``image_encoder.`` keys, strip that prefix, rename ``mlp.lin1/2`` to ``mlp.fc1/2``. That is
all the key mapping the SAM checkpoints and micro-sam's (the same state dict, fine-tuned)
need, so this module uses timm's filter and adds only the checks that make loading strict.

Preprocessing: SAM normalises 0-255 pixels with mean (123.675, 116.28, 103.53) and std
(58.395, 57.12, 57.375); divided by 255 these are ImageNet's constants, so on [0, 1] inputs
SAM's own normalisation *is* ImageNet's (``SAM_PIXEL_MEAN / 255 == IMAGENET_MEAN``). SAM
pads every image to 1024x1024; here the absolute positional embedding (64x64 for 1024
pixels) is resampled to the input's token grid by timm (bicubic), and the relative position
tables of the global-attention blocks are interpolated by timm's ``get_rel_pos``, so a 448
tile gives a 28x28 grid and a 752x1008 slice a 47x63 grid, without padding.

Input (``options.input``):

* ``native`` (default, today's mode): the tile or slice as it is, the positional embedding
  resampled to its grid (above): a 448 tile is 28x28 tokens of 16 native pixels.
* ``sam``: SAM's own preprocessing (backbones/frame.py): the longest side resized to the
  encoder's input size (1024), padded bottom/right with zeros after SAM's normalisation, so
  the encoder always runs at its trained 64x64 positional grid; the grid is of the whole
  frame, and predictions are mapped back to the native grid (padding cropped, resized) by
  ``frame.frame_to_native``. A 448 tile is then 64x64 tokens of 7 native pixels.

Features (``options.features``):

* ``neck`` (default): the encoder's output, the last block through SAM's neck (1x1 conv,
  LayerNorm2d, 3x3 conv, LayerNorm2d; 256 channels). This is SAM's image embedding, the
  tensor the mask decoder reads and that micro-sam's EM fine-tuning optimised through the
  decoder, so "general versus EM-pretrained" compares the encoders' actual outputs; it is
  also the only normalised output (SAM's blocks have no final LayerNorm).
* ``block``: the raw tokens of the blocks in ``layers`` (embed_dim channels each), the same
  depth other families report; needed for multi-level ``layers``, because the neck was
  trained on the last block only. The unused neck is removed (neither counted nor trained).

Weights (``weights`` in the config entry):

* ``pretrained``: SAM's own weights (``samvit_*.sa1b``) from the hub cache, loaded by timm;
  or, with ``options.micro_sam`` naming a model of ``MICRO_SAM_MODELS``, micro-sam's
  fine-tuned checkpoint, downloaded by ``fetch_weights`` from the URL micro-sam's registry
  publishes and verified against its published xxh128 checksum.
* ``random``: seeded random initialisation (``options.init_seed``, default 0).
* a path: a segment-anything / micro-sam checkpoint (``image_encoder.*``, ``prompt_encoder.*``,
  ``mask_decoder.*``; or micro-sam's training format, ``{"model_state": {"sam.<key>": ...}}``),
  or this backbone's own ``model.state_dict()``; loaded strictly (``load_sam_state_dict``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from em_foundation.backbones.base import Backbone, BackboneOutput, FamilyBackbone
from em_foundation.backbones.checkpoint import WeightsError, load_weights_strict, require_file
from em_foundation.backbones.frame import frame_shape, to_frame
from em_foundation.backbones.hub import HubSource, resolve_pretrained
from em_foundation.backbones.timm_vit import (
    TimmWeights,
    check_patch_size,
    create_timm_model,
    resolve_layers,
    resolve_timm_weights,
    timm_hub_source,
)
from em_foundation.families import family_of

# segment-anything's Sam.pixel_mean / pixel_std (0-255 scale): ImageNet's constants x 255.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

FEATURES = ("neck", "block")
INPUTS = ("native", "sam")

# micro-sam's EM models, as its model registry publishes them (micro_sam/v1/util.py,
# ``models()``: encoder_urls and encoder_registry, pooch "xxh128:" hashes). Each is a full
# segment-anything state dict of the architecture named here, fine-tuned on EM organelles
# starting from SAM's own weights of the same size. vit_h has no EM-organelles model.
MICRO_SAM_MODELS: dict[str, dict[str, str]] = {
    "vit_b_em_organelles": {
        "model": "samvit_base_patch16",
        "url": "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/noisy-ox/1.2/files/vit_b.pt",
        "checksum": "xxh128:f3bf2ed83d691456bae2c3f9a05fb438",
    },
    "vit_l_em_organelles": {
        "model": "samvit_large_patch16",
        "url": "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/humorous-crab/1.2/files/vit_l.pt",
        "checksum": "xxh128:810b084b6e51acdbf760a993d8619f2d",
    },
}

# The published sizes, as config entries (read by the parameter table's documentation and
# tests): SAM's three encoders and micro-sam's EM models of the same architectures.
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "sam_b": {"family": "sam", "model": "samvit_base_patch16.sa1b"},
    "sam_l": {"family": "sam", "model": "samvit_large_patch16.sa1b"},
    "sam_h": {"family": "sam", "model": "samvit_huge_patch16.sa1b"},
    "usam_b_em": {"family": "sam", "model": "samvit_base_patch16", "options": {"micro_sam": "vit_b_em_organelles"}},
    "usam_l_em": {"family": "sam", "model": "samvit_large_patch16", "options": {"micro_sam": "vit_l_em_organelles"}},
}

# Parts of a segment-anything checkpoint that are not the image encoder: ignored on purpose.
IGNORED_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def _options(spec: dict[str, Any]) -> dict[str, Any]:
    return spec.get("options") or {}


def _model_name(spec: dict[str, Any]) -> str:
    return spec.get("model") or family_of(spec["family"]).default_model


def micro_sam_entry(spec: dict[str, Any]) -> dict[str, str] | None:
    """The ``MICRO_SAM_MODELS`` row that ``options.micro_sam`` names (None: no micro-sam model)."""
    name = _options(spec).get("micro_sam")
    if not name:
        return None
    if name not in MICRO_SAM_MODELS:
        raise WeightsError(
            f"options.micro_sam {name!r} is not a micro-sam EM model this workflow knows; known: "
            f"{', '.join(MICRO_SAM_MODELS)} (or set weights to a local micro-sam checkpoint file)"
        )
    entry = MICRO_SAM_MODELS[name]
    architecture = _model_name(spec).split(".")[0]
    if architecture != entry["model"]:
        raise WeightsError(
            f"options.micro_sam {name!r} is a {entry['model']} checkpoint, but model is {_model_name(spec)!r}; "
            f"set model: {entry['model']}"
        )
    return entry


def hub_source(spec: dict[str, Any]) -> HubSource:
    """micro-sam's URL and checksum with ``options.micro_sam``; otherwise timm's hub repository."""
    entry = micro_sam_entry(spec)
    if entry is not None:
        return HubSource(
            repo_id=None, url=entry["url"], checksum=entry["checksum"], label=f"micro_sam/{_options(spec)['micro_sam']}"
        )
    published = ", ".join(p["model"] for p in BACKBONE_PRESETS.values() if "options" not in p)
    return timm_hub_source(
        _model_name(spec),
        f"SAM's published encoders: {published}; micro-sam's EM models: options.micro_sam one of "
        + ", ".join(MICRO_SAM_MODELS),
    )


def read_sam_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a segment-anything or micro-sam checkpoint file (or a timm-format one).

    micro-sam's training checkpoints hold the model under ``model_state`` with a ``sam.``
    prefix (and optimiser and decoder states beside it, which are not model weights);
    ``micro_sam.util._load_checkpoint`` unwraps them the same way.
    """
    require_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable, truncated, or a pickle of more than tensors
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"weights file {path} is not a checkpoint file of tensors ({reason}); export micro-sam training "
            "checkpoints with micro_sam.util.export_custom_sam_model first"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model_state"), dict):
        state = {key.removeprefix("sam."): value for key, value in state["model_state"].items()}
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def encoder_state_dict(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The image encoder's tensors in timm's names; every other key is named in an error.

    A segment-anything state dict (``image_encoder.*``) goes through timm's own
    ``checkpoint_filter_fn``; the prompt encoder and mask decoder are dropped on purpose;
    SAM's pixel constants, if a file stores them, must be SAM's. A key that is none of these
    (a different model's checkpoint, a typo) is refused rather than silently dropped, as
    timm's filter alone would do.
    """
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    if not any(key.startswith("image_encoder.") for key in state):
        return state  # timm's names (this backbone's own state dict): loaded strictly as they are
    stray = []
    for key, value in state.items():
        if key.startswith("image_encoder.") or key.startswith(IGNORED_PREFIXES):
            continue
        expected = {"pixel_mean": SAM_PIXEL_MEAN, "pixel_std": SAM_PIXEL_STD}.get(key)
        if expected is not None and torch.allclose(value.flatten().float(), torch.tensor(expected)):
            continue
        stray.append(key)
    if stray:
        raise WeightsError(
            f"weights file {path} has keys that are neither SAM's image encoder nor its prompt encoder or mask "
            f"decoder (first 5 of {len(stray)}): {stray[:5]}; is it a segment-anything / micro-sam checkpoint?"
        )
    return checkpoint_filter_fn(state, None)


class SamEncoder(FamilyBackbone):
    """SAM's image encoder: the neck output (default) or chosen blocks' tokens as a (C, H/16, W/16) grid."""

    def __init__(self, spec: dict[str, Any]) -> None:
        # family = SAM's own constants on [0, 1] inputs = ImageNet's (module docstring).
        super().__init__(spec)
        options = _options(spec)
        self.features = options.get("features", "neck")
        if self.features not in FEATURES:
            raise ValueError(f"options.features {self.features!r} is not one of {', '.join(FEATURES)}")
        self.input = options.get("input", "native")
        if self.input not in INPUTS:
            raise ValueError(
                f"options.input {self.input!r} is not one of {', '.join(INPUTS)} (native: the tile as it is; "
                "sam: SAM's own resize to 1024 and padding)"
            )
        if (spec.get("pooling") or "mean") != "mean":
            raise ValueError("SAM's encoder has no class token: set pooling: mean (the grid's average)")
        name = _model_name(spec)
        weights = spec.get("weights") or "pretrained"
        if weights == "pretrained" and micro_sam_entry(spec) is not None:
            # micro-sam's files are segment-anything checkpoints: loaded by this module, not timm
            fetched = resolve_pretrained(spec, hub_source(spec))
            resolved = TimmWeights(f"micro_sam:{options['micro_sam']}|{fetched.identity}", file=fetched.path)
        else:
            resolved = resolve_timm_weights(spec, name, hub_source)
        self.identity = f"{resolved.identity}|features={self.features}"
        # No dynamic_img_size argument: SAM's patch embedding accepts any multiple of 16 and
        # the model resamples its positional embedding to the grid every call.
        self.model = create_timm_model(name, resolved, **dict(spec.get("model_kwargs") or {}))
        if resolved.file is not None:
            load_weights_strict(
                self.model, encoder_state_dict(read_sam_checkpoint(resolved.file), resolved.file), resolved.file
            )
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        check_patch_size(spec, self.patch_size)
        self.layers = list(spec.get("layers") or [-1])
        depth = len(self.model.blocks)
        self.block_indices = resolve_layers(self.layers, depth)
        if self.features == "neck":
            if self.block_indices != [depth - 1]:
                raise ValueError(
                    f"layers {self.layers}: SAM's neck was trained on the last block only; for multi-level "
                    "features set options.features: block"
                )
            self.embed_dim = int(self.model.num_features)  # the neck's channels (256)
        else:
            self.model.neck = nn.Identity()
            self.embed_dim = int(self.model.embed_dim) * len(self.block_indices)
        self.pooling = "mean"
        if self.input == "sam":
            # the encoder's own input size: its positional grid times the patch (1024 for SAM)
            self.input_frame = int(self.model.pos_embed.shape[1]) * self.patch_size
            self.identity += f"|input=sam{self.input_frame}"

    def check_input(self, images: torch.Tensor) -> None:
        if self.input_frame is None:
            super().check_input(images)
        elif images.ndim != 4 or images.shape[1] != 1:  # any size: resized into the frame
            raise ValueError(f"expected grayscale images (B, 1, H, W), got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x = self.normalise(images)
        if self.input_frame is not None:
            x = to_frame(x, self.input_frame)
        if self.features == "neck":
            grid = self.model.forward_features(x)
        else:
            grids = self.model.forward_intermediates(
                x, indices=self.block_indices, norm=False, stop_early=True, intermediates_only=True
            )
            grid = torch.cat(grids, dim=1)
        image = grid
        if self.input_frame is not None:  # the embedding of the image, not of its padding
            inner = frame_shape(*images.shape[-2:], self.input_frame)
            image = grid[..., : -(-inner[0] // self.patch_size), : -(-inner[1] // self.patch_size)]
        return BackboneOutput(grid=grid, pooled=image.mean(dim=(2, 3)))


def build(spec: dict[str, Any]) -> Backbone:
    """Builder of the sam family (em_foundation.families)."""
    return SamEncoder(spec)
