"""What every backbone gives the rest of the workflow: a patch-token grid and a pooled embedding."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from em_foundation.families import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

# Explicit overrides of a family's own constants: "imagenet" reproduces the published
# pipeline (all three families), "clip" is OpenAI CLIP's, which some LAION checkpoints
# (ViT-L-14 laion2b_s32b_b82k: mean = std = 0.5) were not trained with.
NAMED_NORMALISATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}


def normalisation_constants(
    choice: str | None, family_mean: tuple[float, ...], family_std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for ``normalisation`` = family (the weights' own; the default), imagenet or clip."""
    if choice in (None, "family"):
        return family_mean, family_std
    if choice not in NAMED_NORMALISATION:
        raise ValueError(f"normalisation {choice!r} is not one of family, {', '.join(NAMED_NORMALISATION)}")
    return NAMED_NORMALISATION[choice]


@contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Random initialisation from its own seed, leaving the global random state untouched.

    Without the fork, ``torch.manual_seed(init_seed)`` would reset the global generator
    that the run seeded, so the LoRA adapters and the head built after the backbone would
    start from the same weights for every run seed. With it, the backbone's weights depend
    only on ``init_seed`` (they are the "weights", shared by every run) and the trainable
    parts only on the run's seed. ``None``: nothing random to seed (pretrained or file weights).
    """
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class BackboneOutput(NamedTuple):
    grid: torch.Tensor  # (B, C, H/p, W/p) patch tokens, class and register tokens dropped
    pooled: torch.Tensor  # (B, C) one embedding per input, for the domain analysis


class Backbone(nn.Module):
    """Base class: grayscale images in [0, 1] in, patch-token grid out.

    Preprocessing (3-channel replication, the family's normalisation) happens inside
    ``forward``, so feature caching, LoRA training and evaluation cannot disagree on it.

    Attributes set by subclasses:
        family: registry name of the family (dinov2, dinov3, openclip, filterbank).
        patch_size: input pixels per token along each side; input sides must be multiples.
        embed_dim: channels of the grid (all selected layers concatenated).
        identity: what the weights are (file hash, hub revision, or random-init seed), recorded
            in the feature cache so that changed weights are never mixed with old features.
    """

    family: str = ""
    patch_size: int = 1
    embed_dim: int = 0
    identity: str = ""
    # Side of the square frame every input is resized and padded into (SAM's own input,
    # backbones/frame.py); None: the input's own grid, one token per patch.
    input_frame: int | None = None

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def check_input(self, images: torch.Tensor) -> None:
        """Grayscale (B, 1, H, W) with sides that are multiples of the patch size, or a clear error."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected grayscale images (B, 1, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"{self.family or 'backbone'} input {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] to (B, 3, H, W) normalised with this family's constants."""
        self.check_input(images)
        return (images.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> BackboneOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The grid ``forward`` gives for a (height, width) input: the frame's, or one token per patch."""
        if self.input_frame is not None:
            return self.input_frame // self.patch_size, self.input_frame // self.patch_size
        return height // self.patch_size, width // self.patch_size

    def describe(self) -> dict[str, object]:
        """Attributes recorded with cached features."""
        return {
            "family": self.family,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "weights_identity": self.identity,
            "mean": [float(v) for v in self.mean.flatten()],
            "std": [float(v) for v in self.std.flatten()],
            # only where set, so that the caches of every other backbone keep their attributes
            **({"input_frame": self.input_frame} if self.input_frame is not None else {}),
        }


class FamilyBackbone(Backbone):
    """A backbone normalised as its family's row and the config entry's ``normalisation`` say."""

    def __init__(
        self, spec: dict[str, Any], weights_constants: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    ) -> None:
        """``weights_constants``: the mean/std the weights record (timm's pretrained_cfg); else the family row's."""
        from em_foundation.families import family_of

        family = family_of(spec["family"])
        own_mean, own_std = weights_constants or (family.mean, family.std)
        super().__init__(*normalisation_constants(spec.get("normalisation"), own_mean, own_std))
        self.family = family.name
        self.family_row = family
