"""SAM's own input frame: the longest side resized to the encoder's input size, padded bottom/right.

segment-anything's ``SamPredictor`` resizes every image so that its longest side is the
encoder's ``img_size`` (1024; ``ResizeLongestSide.get_preprocess_shape`` rounds the other
side), normalises it, pads it with zeros on the bottom and right to a square
(``Sam.preprocess``), and maps masks back by upsampling to the square, cropping the padding
and resizing to the original shape (``Sam.postprocess_masks``). These functions are those
three steps on batched tensors, so an encoder in ``options.input: sam`` mode sees each tile
or slice at the 64x64 positional grid it was trained on, and every prediction comes back on
the native grid with the padding cut away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_shape(height: int, width: int, frame: int) -> tuple[int, int]:
    """The image's size inside the square frame (segment-anything's get_preprocess_shape)."""
    scale = frame / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_frame(images: torch.Tensor, frame: int) -> torch.Tensor:
    """Normalised (B, C, H, W) images resized (longest side = ``frame``) and zero-padded bottom/right.

    Bilinear with antialiasing, as segment-anything's ``apply_image_torch``; zeros after
    normalisation are SAM's padding (the mean colour). Normalising before resizing gives the
    same pixels as after: interpolation weights sum to one.
    """
    height, width = images.shape[-2:]
    inner = frame_shape(height, width, frame)
    if inner != (height, width):
        images = F.interpolate(images, size=inner, mode="bilinear", align_corners=False, antialias=True)
    return F.pad(images, (0, frame - inner[1], 0, frame - inner[0]))


def frame_to_native(maps: torch.Tensor, native: tuple[int, int], frame: int) -> torch.Tensor:
    """(B, C, h, w) maps over the whole frame back to the native (H, W) grid: upsampled to the
    frame, the padding cropped, resized to the native shape (segment-anything's postprocess_masks)."""
    if tuple(maps.shape[-2:]) != (frame, frame):
        maps = F.interpolate(maps, size=(frame, frame), mode="bilinear", align_corners=False)
    inner = frame_shape(*native, frame)
    maps = maps[..., : inner[0], : inner[1]]
    if inner != tuple(native):
        maps = F.interpolate(maps, size=tuple(native), mode="bilinear", align_corners=False)
    return maps


def labels_to_frame(labels: torch.Tensor, frame: int, fill: int) -> torch.Tensor:
    """(N, H, W) label maps into the frame as the images go (nearest), the padding ``fill`` (ignored)."""
    height, width = labels.shape[-2:]
    inner = frame_shape(height, width, frame)
    resized = F.interpolate(labels[:, None].float(), size=inner, mode="nearest-exact")[:, 0]
    return F.pad(resized, (0, frame - inner[1], 0, frame - inner[0]), value=float(fill)).to(labels.dtype)
