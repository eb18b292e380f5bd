"""Training-batch augmentation: flips and 90° rotations (``training.augment``), drawn from the run's generator.

``none`` (default, the published setup) leaves every batch as it is and draws nothing, so
runs without augmentation keep their random sequence. ``flips_rot90`` maps each tile of a
batch, inputs and labels together, by one of the eight symmetries of the square (identity,
three rotations, four flips), drawn from the run's generator: the same seed gives the same
transforms, and a resumed run (the generator is in the checkpoint) continues the sequence.

Pixel regimes (lora, fullft, supervised) transform tile pixels. Cached regimes (head) transform
the cached token grid with its labels: the token at (i, j) covers pixels (i*p..(i+1)*p, j*p..),
so flipping or rotating the grid with the labels keeps each token over its own pixels. It is a
weaker augmentation than on pixels (a token of the flipped tile is not the flipped token),
and only valid when the labels are exactly the grid times the patch size, which is checked.
The random forest (``forest``) does not train through this loop and is never augmented.
Non-square tiles (resize views) are only flipped or turned by 180°, so a batch keeps its shape.
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "flips_rot90")


def augmentation_of(training: dict) -> str:
    """The configured augmentation, or a clear error naming the key and the choices."""
    name = str(training.get("augment", "none"))
    if name not in AUGMENTATIONS:
        raise ValueError(f"training.augment {name!r} is not one of {', '.join(AUGMENTATIONS)}")
    return name


def _apply(tensor: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    # (..., H, W): rotate k quarter turns, then flip left-right
    tensor = torch.rot90(tensor, k, dims=(-2, -1)) if k else tensor
    return torch.flip(tensor, dims=(-1,)) if flip else tensor


def augment_batch(
    inputs: torch.Tensor, labels: torch.Tensor, name: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs`` (B, C, h, w) and ``labels`` (B, H, W), each tile mapped by its own drawn symmetry."""
    if name == "none":
        return inputs, labels
    if name not in AUGMENTATIONS:
        raise ValueError(f"training.augment {name!r} is not one of {', '.join(AUGMENTATIONS)}")
    height, width = labels.shape[-2:]
    grid_h, grid_w = inputs.shape[-2:]
    if height % grid_h or width % grid_w or height // grid_h != width // grid_w:
        raise ValueError(
            f"training.augment {name}: labels {height}x{width} are not the inputs' {grid_h}x{grid_w} grid times one "
            "patch size, so a flip would move labels off their inputs; set training.augment: none for this regime"
        )
    square = height == width
    # One draw per tile from the run's generator (CPU), whatever device the batch is on.
    k = torch.randint(0, 4 if square else 2, (len(labels),), generator=generator) * (1 if square else 2)
    flip = torch.randint(0, 2, (len(labels),), generator=generator).bool()
    out_inputs = [_apply(x, int(ki), bool(fi)) for x, ki, fi in zip(inputs, k, flip)]
    out_labels = [_apply(y, int(ki), bool(fi)) for y, ki, fi in zip(labels, k, flip)]
    return torch.stack(out_inputs), torch.stack(out_labels)
