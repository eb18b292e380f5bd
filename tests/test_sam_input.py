"""SAM-family encoders at the input they were trained on (``options.input: sam``): every tile or
slice resized (longest side = the encoder's input size) and padded bottom/right as
segment-anything's preprocessing does, the full positional grid, predictions back on the
native grid with the padding cropped. Tiny random-initialised encoders: nothing downloaded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from em_foundation.backbones import build_backbone
from em_foundation.backbones.frame import frame_shape, frame_to_native, labels_to_frame, to_frame
from em_foundation.data.prepared import IGNORE_LABEL
from em_foundation.grid import view_of
from em_foundation.training.forest import token_labels
from em_foundation.training.segmenter import BackboneSegmenter

# SAM's ViT-B layout at toy width, with SAM's own 1024-pixel input: a 64x64 positional grid.
SAM_1024 = {
    "family": "sam",
    "model": "samvit_base_patch16",
    "weights": "random",
    "options": {"input": "sam"},
    "model_kwargs": {
        "depth": 2,
        "embed_dim": 16,
        "num_heads": 1,
        "global_attn_indexes": [1],
        "window_size": 8,
        "neck_chans": 8,
        "img_size": 1024,
    },
}


def spec(**options) -> dict:
    entry = copy.deepcopy(SAM_1024)
    entry["options"].update(options)
    return entry


@pytest.fixture(scope="module")
def encoder():
    return build_backbone(spec())


def test_segment_anything_preprocess_shape():
    # segment-anything's ResizeLongestSide.get_preprocess_shape: scale the long side to 1024, round the other
    assert frame_shape(448, 448, 1024) == (1024, 1024)
    assert frame_shape(768, 1024, 1024) == (768, 1024)
    assert frame_shape(752, 1008, 1024) == (764, 1024)
    assert frame_shape(1463, 1613, 1024) == (929, 1024)


@pytest.mark.parametrize("shape", [(448, 448), (768, 1024), (200, 300), (112, 112)])
def test_the_token_grid_is_the_64x64_positional_grid_for_every_input(encoder, shape):
    seen = []
    hook = encoder.model.patch_embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    images = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = encoder(images)
    finally:
        hook.remove()
    assert out.grid.shape == (1, 8, 64, 64) and encoder.token_grid(*shape) == (64, 64)
    assert tuple(encoder.model.pos_embed.shape[1:3]) == (64, 64)
    (x,) = seen
    assert x.shape == (1, 3, 1024, 1024), "the encoder runs on SAM's 1024 square"
    inner = frame_shape(*shape, 1024)
    assert torch.all(x[..., inner[0] :, :] == 0) and torch.all(x[..., :, inner[1] :] == 0), "padded bottom/right"
    # inside the frame: the image resized, normalised with SAM's pixel mean and std (0-255 scale)
    sam_mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    sam_std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    expected = (images.expand(-1, 3, -1, -1) * 255 - sam_mean) / sam_std
    if inner != shape:
        expected = F.interpolate(expected, size=inner, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x[..., : inner[0], : inner[1]], expected, atol=1e-4, rtol=1e-4)


def test_todays_mode_stays_the_default_and_an_option(encoder):
    for native in (build_backbone(spec(input="native")), build_backbone({**spec(), "options": {}})):
        assert native.input_frame is None and native.token_grid(448, 448) == (28, 28)
        with torch.no_grad():
            assert native(torch.rand(1, 1, 448, 448)).grid.shape == (1, 8, 28, 28)
    assert "input=sam1024" in encoder.identity and "input=sam" not in native.identity  # caches never mixed
    assert encoder.describe()["input_frame"] == 1024 and "input_frame" not in native.describe()
    with pytest.raises(ValueError, match="options.input 'square'"):
        build_backbone(spec(input="square"))


def test_predictions_come_back_at_native_shape(encoder):
    segmenter = BackboneSegmenter(encoder, width=8).eval()
    for shape in ((96, 160), (448, 448)):
        with torch.no_grad():
            logits = segmenter(torch.rand(2, 1, *shape), shape)
        assert logits.shape == (2, 2, *shape)


@pytest.mark.parametrize("shape", [(96, 160), (300, 200), (768, 1024)])
def test_a_mask_aligned_with_the_native_grid_stays_aligned(shape):
    """Into the frame as the images go, back with frame_to_native: the same mask. Stretching the
    whole (padded) frame onto the tile instead would shift and squash it."""
    mask = torch.zeros(1, 1, *shape)
    mask[..., shape[0] // 4 : shape[0] // 2, shape[1] // 3 : shape[1] - 5] = 1
    framed = to_frame(mask, 1024)
    back = frame_to_native(framed, shape, 1024)
    assert back.shape == mask.shape

    def iou(a, b):
        return float(((a > 0.5) & (b > 0.5)).sum() / ((a > 0.5) | (b > 0.5)).sum())

    assert iou(back, mask) > 0.97
    stretched = F.interpolate(framed, size=shape, mode="bilinear", align_corners=False)
    assert iou(stretched, mask) < 0.8, "without cropping the padding the mask would not line up"


def test_labels_go_into_the_frame_and_its_padding_is_ignored():
    labels = np.zeros((1, 96, 192), np.uint8)
    labels[0, :48, :96] = 1  # the top-left quarter
    framed = labels_to_frame(torch.from_numpy(labels), 1024, IGNORE_LABEL).numpy()
    assert framed.shape == (1, 1024, 1024)
    assert (framed[0, 512:] == IGNORE_LABEL).all() and (framed[0, :512] != IGNORE_LABEL).all()
    tokens = token_labels(labels, 16, input_frame=1024)
    assert tokens.shape == (1, 64, 64)
    assert (tokens[0, :16, :32] == 1).all() and (tokens[0, 16:32] == 0).all() and (tokens[0, 32:] == IGNORE_LABEL).all()


def test_resize_mode_gives_sam_inputs_of_its_own_size():
    config = {
        "tiling": {"mode": "resize", "tile_size": 448, "overlap": 64, "longest_edge": 1022},
        "backbones": {"sam": spec(), "native": {**spec(), "options": {}}},
    }
    assert view_of(config, "sam") == "resize1024p16" and view_of(config, "native") == "resize1008p16"
    config["tiling"]["mode"] = "tile"
    assert view_of(config, "sam") == view_of(config, "native") == "tile448o64"


def test_head_on_cached_sam_frame_tokens_trains_and_scores_at_native_shape(tmp_path):
    from em_foundation.evaluation.evaluate import evaluate_model
    from em_foundation.feature_cache import read_cache_attrs, read_tokens
    from em_foundation.training.run import load_segmenter, train_run
    from tests.helpers import HEAD, TRAINING, make_dataset

    small = spec()
    small["model_kwargs"]["img_size"] = 256  # a 16x16 grid keeps the CPU test short; 112 tiles padded into it
    data = make_dataset(tmp_path, "fibsem", "fibsem", n_train=3, n_test=1, backbone=small)
    assert read_tokens(data["features"], "train").shape[-2:] == (16, 16)
    assert read_cache_attrs(data["features"])["input_frame"] == 256
    train_run(
        regime="head",
        backbone_name="sam",
        train_set="fibsem",
        datasets=["fibsem"],
        seed=0,
        backbone={},
        head=HEAD,
        lora={},
        training={**TRAINING, "max_epochs": 1},
        tiles={"fibsem": data["tiles"]},
        features={"fibsem": data["features"]},
        splits={"fibsem": str(tmp_path / "fibsem.split0.json")},
        device=torch.device("cpu"),
        out_model=tmp_path / "model.pt",
        out_log=tmp_path / "log.csv",
        out_run=tmp_path / "run.json",
    )
    model = load_segmenter(tmp_path / "model.pt", {})
    assert model.input_frame == 256  # the frame travels with the model
    per_image, predictions = evaluate_model(
        model, "head", data["prepared"], data["tiles"], data["features"], torch.device("cpu")
    )
    assert all(p.shape == (128, 128) for p in predictions) and len(predictions) == 1
