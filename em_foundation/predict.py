"""Apply a trained model to unlabelled images: a probability map, a mask and a quick-look overlay per image.

The images (a folder of 2-D PNG/TIFF files or a stack, read by the same readers as the
generic converters) are cut into the inputs the model was trained on (the config's tiling
view), predicted, and stitched back to their native resolution. Non-8-bit images get the
generic converters' percentile stretch, fitted on the images given. Cached-feature regimes
(head, forest) run the frozen backbone on the fly, as the feature cache did.

A model trained with an alignment variant is applied with it: the images given are the
target domain, so its statistics (intensity normalisation, feature standardisation, AdaBN)
come from them, as evaluation takes a test dataset's from its unlabelled images; a common
pixel size (rescale) comes with the view.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tifffile
import torch
from PIL import Image
from tqdm import tqdm

from em_foundation.data.generic import (
    read_plane,
    read_volume,
    stretch_to_uint8,
    unlabelled_files,
)
from em_foundation.data.tile_grid import TileGrid, extract_tiles
from em_foundation.data.tiles import TileSet, intensity_table, resample_split, resize_images, resized_shape
from em_foundation.evaluation.evaluate import predict_image
from em_foundation.feature_cache import _autocast, to_unit_float
from em_foundation.grid import parse_alignment

OVERLAY_EDGE = 512  # longest edge of the quick-look PNG


def read_unlabelled(source: str | Path) -> list[tuple[str, np.ndarray]]:
    """(name, 2-D image) pairs from a folder (file stems) or a stack (slice numbers)."""
    path = Path(source)
    if path.is_dir() and path.suffix != ".zarr":
        return [(name, read_plane(file, "predict")) for name, file in unlabelled_files(path)]
    stack = read_volume(Path.cwd(), str(source), "predict", "images")
    return [(str(z), image) for z, image in enumerate(stack)]


def read_model_record(path: str | Path) -> dict[str, Any]:
    """What a model.pt records, read without building anything (memory-mapped: a full
    fine-tuning checkpoint is not read twice into memory)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def check_model_fits(
    path: str | Path,
    saved: dict[str, Any],
    regime: str,
    backbone_name: str,
    spec: dict[str, Any],
    backbone: Optional[torch.nn.Module],
) -> None:
    """Stop, naming both sides, where the model does not fit the configured backbone and regime.

    Everything model.pt records is compared: its regime; the backbone spec it was trained
    with (family, model, weights, layers, options ... : backbone-training regimes keep it);
    the patch size, token channels and weights identity of the tokens it read (the head and
    the forests, which keep no spec). A model on a look-alike backbone would otherwise run and
    return wrong probabilities.
    """
    config = saved.get("config") or {}
    problems = []
    if saved.get("regime") != regime:
        problems.append(f"it is a {saved.get('regime')!r} model, and predict.regime is {regime!r}")
    recorded = config.get("backbone") or {}
    for key in sorted(recorded):
        if key in spec and recorded[key] != spec[key]:
            problems.append(
                f"it was trained with {key} {recorded[key]!r}, and backbones.{backbone_name}.{key} is {spec[key]!r}"
            )
    if backbone is not None:
        for key, ours in (("patch_size", backbone.patch_size), ("in_channels", backbone.embed_dim)):
            if saved.get(key) is not None and int(saved[key]) != int(ours):
                problems.append(f"it reads tokens of {key} {saved[key]}, and backbone {backbone_name!r} gives {ours}")
        identities = set((config.get("weights_identity") or {}).values())
        if identities and identities != {backbone.identity}:
            problems.append(
                f"it was trained on tokens of weights {sorted(identities)}, and backbone {backbone_name!r} has {backbone.identity!r}"
            )
    tokens = (saved.get("features") or {}).get("token_channels")
    if tokens is not None and int(tokens) != (backbone.embed_dim if backbone is not None else 0):
        ours = backbone.embed_dim if backbone is not None else 0
        problems.append(f"it reads {tokens} token channels per pixel, and backbone {backbone_name!r} gives {ours}")
    if problems:
        trained_on = config.get("backbone_name")
        raise ValueError(
            f"predict: {path} (trained as {saved.get('regime')!r} on backbone {trained_on!r}) does not fit backbone "
            f"{backbone_name!r} ({spec.get('family')}) with regime {regime!r}: "
            + "; ".join(problems)
            + ". Set predict.backbone and predict.regime to the ones the model was trained with."
        )


def tile_image(image: np.ndarray, view: dict[str, Any], pixel_size_nm: Optional[tuple[float, float]]) -> TileSet:
    """One uint8 slice cut into the inputs of ``view``, exactly as tile_dataset cuts a prepared slice."""
    height, width = image.shape
    raw = image[None]
    grid_shape = (height, width)
    if view.get("pixel_size_nm"):
        raw, _, grid_shape = resample_split(raw, np.zeros_like(raw), pixel_size_nm, float(view["pixel_size_nm"]))
    if view["mode"] == "tile":
        tile, overlap = view["tile_size"], view["overlap"]
        grid = TileGrid.for_shape(*grid_shape, tile, overlap)
        tiles = extract_tiles(raw[0], grid)
        positions = np.array(grid.positions, dtype=np.int32)
    else:
        shape = resized_shape(height, width, view["longest_edge"], view["patch_size"])
        tiles = resize_images(raw, shape, "bicubic")
        positions = np.zeros((1, 2), dtype=np.int32)
        tile, overlap = max(shape), 0
    return TileSet(
        raw=tiles,
        labels=np.zeros_like(tiles),
        image_index=np.zeros(len(tiles), dtype=np.int32),
        positions=positions,
        names=["image"],
        height=height,
        width=width,
        tile=tile,
        overlap=overlap,
        mode=view["mode"],
        grid_height=grid_shape[0],
        grid_width=grid_shape[1],
    )


def model_inputs(tile_set: TileSet, backbone: Optional[torch.nn.Module], batch: int, device: torch.device):
    """Pixels for backbone regimes; float16 tokens from the frozen backbone for cached ones (as cached)."""
    pixels = to_unit_float(tile_set.raw)
    if backbone is None:
        return pixels
    tokens = []
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(pixels), batch):
            tokens.append(backbone(pixels[start : start + batch].to(device)).grid.to(torch.float16).cpu())
    return torch.cat(tokens)


def normalise_intensity(
    images: list[np.ndarray],
    intensity: str,
    reference: Optional[str | Path] = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> list[np.ndarray]:
    """The alignment's per-domain intensity normalisation, fitted on every pixel of the images given."""
    if intensity == "raw":
        return images
    table = intensity_table(np.concatenate([image.ravel() for image in images]), intensity, reference, percentiles)
    return [table[image] for image in images]


def align_inputs(
    model: torch.nn.Module, inputs: list[torch.Tensor], alignment: str, cached: bool, batch_size: int
) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """featstd and adabn with the statistics of every input of the images given (their own domain)."""
    from em_foundation.alignment import adapt_batchnorm, domain_stats, segmenter_forward, standardise

    options = parse_alignment(alignment)
    if options["feature_std"]:
        if not cached:
            raise ValueError(f"alignment {alignment!r}: featstd standardises cached tokens; this model reads pixels")
        stats = domain_stats(torch.cat(inputs).numpy(), dataset="predict")
        inputs = [torch.from_numpy(standardise(x.numpy(), stats, dtype=np.float16)) for x in inputs]
    if options["adabn"]:
        everything = torch.cat(inputs)
        batches = (everything[start : start + batch_size] for start in range(0, len(everything), batch_size))
        model = adapt_batchnorm(model, batches, segmenter_forward)
    return model, inputs


def write_tiff(path: Path, array: np.ndarray, pixel_size_nm: tuple[float, float]) -> None:
    """ImageJ TIFF whose resolution carries the pixel size in nm (Fiji shows it)."""
    tifffile.imwrite(
        path,
        array,
        imagej=True,
        resolution=(1.0 / pixel_size_nm[1], 1.0 / pixel_size_nm[0]),
        metadata={"unit": "nm"},
    )


def overlay(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Gray image with the mask in translucent red, at most OVERLAY_EDGE pixels on its longest side."""
    rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    rgb[mask > 0] = 0.55 * rgb[mask > 0] + 0.45 * np.array([255.0, 0.0, 0.0])
    picture = Image.fromarray(rgb.round().astype(np.uint8))
    picture.thumbnail((OVERLAY_EDGE, OVERLAY_EDGE))
    return picture


def predict_images(
    model: torch.nn.Module,
    backbone: Optional[torch.nn.Module],
    images: list[tuple[str, np.ndarray]],
    view: dict[str, Any],
    out_dir: Path,
    pixel_size_nm: tuple[float, float],
    device: torch.device,
    batch_size: int = 8,
    threshold: float = 0.5,
    record: Optional[dict[str, Any]] = None,
    pixel_regime: bool = False,
    alignment: str = "none",
    reference: Optional[str | Path] = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> dict[str, Any]:
    """Write <name>_probability.tif, <name>_mask.tif (0/255) and <name>_overlay.png per image, and a summary.

    ``pixel_regime`` (the per-pixel forest): the model takes the tiles' pixels, and the
    backbone's tokens beside them where a backbone is given.
    ``alignment``: the variant the model was trained with, its statistics taken from the
    images given (``reference``: histogram matching's reference prepared dataset). Without
    featstd or adabn every image is read, predicted and written before the next.

    Everything is written into a temporary folder renamed onto ``out_dir`` at the end, so an
    interrupted run leaves no folder Snakemake would take for finished.
    """
    names = [name for name, _ in images]
    eight_bit, _, stretch = stretch_to_uint8([image for _, image in images], [], "predict", names)
    options = parse_alignment(alignment)
    model_view = normalise_intensity(eight_bit, options["intensity"], reference, percentiles)
    whole_domain = options["feature_std"] or options["adabn"]
    if whole_domain and pixel_regime:
        raise ValueError(f"alignment {alignment!r}: featstd and adabn do not apply to a per-pixel forest")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = model.to(device).eval()
    if backbone is not None:
        backbone = backbone.to(device).eval()
    summary = []
    try:
        inputs_of = {}
        if whole_domain:  # statistics over every image first: their inputs are kept until predicted
            tiled = [model_inputs(tile_image(i, view, pixel_size_nm), backbone, batch_size, device) for i in model_view]
            model, aligned = align_inputs(model, tiled, alignment, backbone is not None, batch_size)
            inputs_of = dict(enumerate(aligned))
        for index, (name, image) in enumerate(tqdm(list(zip(names, eight_bit)), desc="predict", unit="image")):
            tile_set = tile_image(model_view[index], view, pixel_size_nm)
            tokens = None
            if pixel_regime:
                inputs = to_unit_float(tile_set.raw)
                tokens = model_inputs(tile_set, backbone, batch_size, device) if backbone is not None else None
            elif whole_domain:
                inputs = inputs_of.pop(index)
            else:
                inputs = model_inputs(tile_set, backbone, batch_size, device)
            probability = predict_image(model, inputs, tile_set, batch_size, device, tokens).astype(np.float32)
            mask = (probability >= threshold).astype(np.uint8) * 255
            write_tiff(tmp / f"{name}_probability.tif", probability, pixel_size_nm)
            write_tiff(tmp / f"{name}_mask.tif", mask, pixel_size_nm)
            overlay(image, mask).save(tmp / f"{name}_overlay.png")
            summary.append({"image": name, "shape": list(image.shape), "foreground_fraction": float((mask > 0).mean())})
        result = {
            **(record or {}),
            "pixel_size_nm": list(pixel_size_nm),
            "threshold": threshold,
            "intensity_stretch": stretch,
            "alignment": alignment,
            "alignment_statistics": "the images given" if alignment != "none" else None,
            "images": summary,
        }
        (tmp / "predictions.json").write_text(json.dumps(result, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
