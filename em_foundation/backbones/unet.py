"""Supervised 2-D U-Nets from segmentation-models-pytorch: a whole segmenter, every parameter trained.

The reference point a lab would otherwise train: the literature's U-Net from scratch, and the
ImageNet ResNet-50 U-Net the authors' repository used as its CNN baseline. The family's row
(em_foundation.families, ``segmenter=True``) makes ``training.build_segmenter`` use this
module's segmenter as it is, with no DeconvHead and no frozen part.

Config entry (``backbones.<name>``): ``options.encoder`` (one of smp's ResNet encoders: resnet18,
resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, ...; default resnet34), ``options.encoder_depth`` (1-5, default 5; the network's
stride is 2**depth), ``options.decoder_channels`` (one width per depth, default smp's
256, 128, 64, 32, 16 cut to the depth). ``weights``:

* ``random``: initialised from the run's own random generator, so seeds differ in their
  initialisation as well as in their batches (the from-scratch U-Nets of the literature).
* ``pretrained``: the encoder's ImageNet weights as smp publishes them (the Hugging Face
  repository ``smp-hub/<encoder>.imagenet``, ``model.safetensors``), fetched by the
  ``fetch_weights`` rule on the login node into ``hub.cache_dir`` and read offline on compute
  nodes through ``hub.resolve_pretrained``; pinned with ``revision`` like every family.
* a file: an encoder state dict (``.safetensors`` or a torch file) in the layout of smp's
  ``model.safetensors`` or torchvision's ResNet files (``fc.*`` present, no BatchNorm
  ``num_batches_tracked``), loaded as smp loads them: the classifier dropped, the rest strict.

Input: grey tiles in [0, 1], replicated to 3 channels and normalised with the family's
constants (ImageNet's), reflect-padded to a multiple of the stride and cropped back, so any
tile or resize view works. Encoder stages deeper than ``encoder_depth`` (smp keeps them) are
removed after the weights are loaded: every parameter left takes part in the forward pass and
trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from em_foundation.backbones.base import normalisation_constants
from em_foundation.backbones.checkpoint import WeightsError, load_state_dict_file, load_weights_strict, require_file
from em_foundation.backbones.hub import HubSource, resolve_pretrained
from em_foundation.families import family_of
from em_foundation.io import file_sha256

DEFAULT_ENCODER = "resnet34"
DEFAULT_DEPTH = 5
DEFAULT_DECODER = (256, 128, 64, 32, 16)
PRETRAINED_TAG = "imagenet"  # the key of smp's per-encoder pretrained settings the family uses


def unet_options(spec: dict[str, Any]) -> tuple[str, int, tuple[int, ...]]:
    """(encoder, depth, decoder channels) of a config entry, with the defaults, or a clear error."""
    options = spec.get("options") or {}
    encoder = str(options.get("encoder", DEFAULT_ENCODER))
    depth = int(options.get("encoder_depth", DEFAULT_DEPTH))
    if not 1 <= depth <= 5:
        raise ValueError(f"backbones.<name>.options.encoder_depth is {depth}; a U-Net encoder has depth 1 to 5")
    decoder = tuple(int(c) for c in options.get("decoder_channels", DEFAULT_DECODER[:depth]))
    if len(decoder) != depth:
        raise ValueError(
            f"backbones.<name>.options.decoder_channels {list(decoder)} has {len(decoder)} widths; "
            f"encoder_depth {depth} needs one per depth"
        )
    return encoder, depth, decoder


def hub_source(spec: dict[str, Any]) -> HubSource:
    """smp's published ImageNet weights of the configured encoder (``smp-hub/<encoder>.imagenet``)."""
    from segmentation_models_pytorch.encoders import encoders

    encoder = unet_options(spec)[0]
    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get(PRETRAINED_TAG)
    if not settings:
        published = sorted(name for name, entry in encoders.items() if PRETRAINED_TAG in entry["pretrained_settings"])
        raise WeightsError(
            f"segmentation-models-pytorch publishes no {PRETRAINED_TAG} weights for encoder {encoder!r}; "
            f"set options.encoder to one that has them ({', '.join(published[:12])}, ...) or weights: random"
        )
    return HubSource(
        repo_id=settings["repo_id"],
        filenames=("model.safetensors",),
        label=f"U-Net encoder {encoder}",
        revision=settings.get("revision"),  # smp pins each repository to a commit; so do we
    )


def resnet_encoders() -> list[str]:
    """smp's encoders of the ResNet class: the ones whose unused deep stages this module can remove."""
    from segmentation_models_pytorch.encoders import encoders
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    return sorted(name for name, entry in encoders.items() if entry["encoder"] is ResNetEncoder)


def _drop_unused_stages(encoder: nn.Module, depth: int) -> None:
    # smp's ResNet encoders keep layer1..layer4 whatever the depth; stage k runs only when depth > k.
    for stage in range(max(depth, 1), 5):
        if hasattr(encoder, f"layer{stage}"):
            delattr(encoder, f"layer{stage}")


class UNetSegmenter(nn.Module):
    """Grey tiles in [0, 1] to two-class logits at ``out_size``; every parameter trainable."""

    family = "unet"

    def __init__(self, spec: dict[str, Any]) -> None:
        import segmentation_models_pytorch as smp

        super().__init__()
        row = family_of(spec["family"])
        mean, std = normalisation_constants(spec.get("normalisation"), row.mean, row.std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        encoder, depth, decoder = unet_options(spec)
        if encoder not in resnet_encoders():
            # Other encoders keep parameters a shallow U-Net never uses, which would not train.
            raise ValueError(
                f"backbones.<name>.options.encoder {encoder!r} is not one of segmentation-models-pytorch's ResNet "
                f"encoders: {', '.join(resnet_encoders())}"
            )
        self.stride = 2**depth
        self.patch_size = self.stride  # input pixels per cell of the deepest feature map
        # No weights here: smp would download them; ours come from the hub cache or a file.
        self.model = smp.Unet(
            encoder_name=encoder,
            encoder_depth=depth,
            encoder_weights=None,
            decoder_channels=decoder,
            in_channels=3,
            classes=2,
        )
        weights = spec.get("weights") or "pretrained"
        if weights == "random":
            self.identity = f"random-init:unet:{encoder}:depth={depth}:decoder={list(decoder)}:run-seed"
        elif weights == "pretrained":
            resolved = resolve_pretrained(spec, hub_source(spec))
            self._load_encoder(resolved.path)
            self.identity = f"smp:{encoder}.{PRETRAINED_TAG}|{resolved.identity}"
        else:
            path = require_file(Path(weights))
            self._load_encoder(path)
            self.identity = f"file:{path.name}:sha256={file_sha256(path)}"
        _drop_unused_stages(self.model.encoder, depth)

    def _load_encoder(self, path: Path) -> None:
        state = load_state_dict_file(path)
        # As smp's ResNetEncoder.load_state_dict: the classifier is dropped, and torch fills the
        # BatchNorm num_batches_tracked buffers that torchvision-layout files lack.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_weights_strict(self.model.encoder, state, path)

    def forward(self, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected grayscale images (B, 1, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        x = (images.expand(-1, 3, -1, -1) - self.mean) / self.std
        if pad_h or pad_w:
            # reflect needs the pad smaller than the side; replicate covers tiny inputs
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        logits = self.model(x)[..., :height, :width]
        if tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits


def build(spec: dict[str, Any]) -> UNetSegmenter:
    """Builder of the unet family (em_foundation.families): the whole segmenter, trainable."""
    model = UNetSegmenter(spec)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
