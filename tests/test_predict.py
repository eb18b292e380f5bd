"""The target `predict`: a trained model on unlabelled images, through the workflow (tiny config)."""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from em_foundation.data.tile_grid import stitch_tiles
from em_foundation.grid import parse_view
from em_foundation.predict import read_unlabelled, tile_image, write_tiff
from tests.workflow import demo_config, scheduled_jobs, snakemake, write_config


def tiny_config() -> dict:
    """One synthetic domain, the filter-bank head, one seed, two epochs: the cheapest trained model."""
    config = demo_config()
    config["datasets"] = {
        "fibsem": {
            **config["datasets"]["fibsem"],
            "options": {"domain": "fibsem", "n_train": 4, "n_test": 2, "height": 64, "width": 64, "seed": 1},
        }
    }
    config["training_sets"] = {"fibsem": ["fibsem"]}
    config["backbones"] = {"filterbank": config["backbones"]["filterbank"]}
    config.update(regimes=["head"], seeds=[0], tiling={"tile_size": 32, "overlap": 8})
    config["training"].update(max_epochs=2, patience=1)
    return config


def test_tile_image_covers_the_slice_and_stitches_back():
    image = np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8)
    tile_set = tile_image(image, parse_view("tile32o8"), (5.0, 5.0))
    np.testing.assert_allclose(stitch_tiles(tile_set.raw.astype(np.float32), tile_set.grid, 8), image, atol=1e-4)
    resampled = tile_image(image, parse_view("tile32o8nm10"), (5.0, 5.0))
    assert (resampled.grid_height, resampled.grid_width) == (25, 35)
    assert resampled.to_native(resampled.raw.astype(np.float32)).shape == (50, 70)


def test_read_unlabelled_stack_and_tiff_pixel_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stack = np.random.default_rng(1).integers(0, 4096, (3, 20, 24), dtype=np.uint16)
    tifffile.imwrite("stack.tif", stack, photometric="minisblack")
    images = read_unlabelled("stack.tif")
    assert [name for name, _ in images] == ["0", "1", "2"]
    np.testing.assert_array_equal(images[2][1], stack[2])
    write_tiff(tmp_path / "m.tif", np.zeros((20, 24), np.float32), (4.0, 5.0))
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        page = tif.pages[0]
        x, y = page.tags["XResolution"].value, page.tags["YResolution"].value
        assert x[1] / x[0] == pytest.approx(5.0) and y[1] / y[0] == pytest.approx(4.0)
        assert tif.imagej_metadata["unit"] == "nm"


@pytest.mark.slow
def test_predict_target_on_new_images(tmp_path):
    """snakemake predict: trains the tiny model, then writes maps, masks and overlays at native size."""
    folder = tmp_path / "new"
    folder.mkdir()
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(folder / "a.png")
    tifffile.imwrite(folder / "b.tif", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    configfile = write_config(tmp_path / "tiny.yaml", tiny_config())
    result = snakemake(
        tmp_path, "predict", "--config", "predict={images: new, pixel_size_nm: [5.0, 5.0]}", configfile=configfile
    )
    out = tmp_path / "results/predictions/new"
    for name, shape in (("a", (70, 90)), ("b", (64, 64))):
        probability = tifffile.imread(out / f"{name}_probability.tif")
        mask = tifffile.imread(out / f"{name}_mask.tif")
        assert probability.shape == mask.shape == shape
        assert 0 <= probability.min() and probability.max() <= 1 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, probability >= 0.5)
        assert Image.open(out / f"{name}_overlay.png").size == (shape[1], shape[0])
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["backbone"] == "filterbank" and summary["regime"] == "head" and summary["seed"] == 0
    assert summary["pixel_size_nm"] == [5.0, 5.0]
    log = (tmp_path / "results/logs/predict/new.log").read_text()
    assert "predicting 2 image(s)" in log and "a: [70, 90], foreground" in log, log[-2000:]
    assert "rule predict" in result.stdout + result.stderr
    assert not list(tmp_path.glob("results/predictions/*.part"))
    # the images are inputs: a new, a removed or a replaced image reruns predict
    target = ("predict", "-n", "--config", "predict={images: new, pixel_size_nm: [5.0, 5.0]}")
    assert not scheduled_jobs(snakemake(tmp_path, *target, configfile=configfile))
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / "c.png")
    assert scheduled_jobs(snakemake(tmp_path, *target, configfile=configfile))["predict"] == 1, "a new image"
    (folder / "c.png").unlink()
    assert not scheduled_jobs(snakemake(tmp_path, *target, configfile=configfile))
    (folder / "b.tif").rename(tmp_path / "b.tif")
    assert scheduled_jobs(snakemake(tmp_path, *target, configfile=configfile))["predict"] == 1, "a removed image"
    (tmp_path / "b.tif").rename(folder / "b.tif")
    time.sleep(0.01)
    tifffile.imwrite(folder / "b.tif", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    assert scheduled_jobs(snakemake(tmp_path, *target, configfile=configfile))["predict"] == 1, "a replaced image"
    # the same model named by its file: nothing is trained again, and the maps are the same
    model = "results/models/filterbank/head/fibsem/none/seed0/model.pt"
    again = snakemake(
        tmp_path,
        "predict",
        "--config",
        f"predict={{images: new, pixel_size_nm: [5.0, 5.0], model: {model}, name: again}}",
        configfile=configfile,
    )
    assert "rule train_head" not in again.stdout + again.stderr
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "results/predictions/again/a_probability.tif"),
        tifffile.imread(out / "a_probability.tif"),
    )
    # a look-alike backbone (patch 16 where the model read patch-8 tokens) is refused, naming both; the
    # model is a copy outside results/, as a user holds it: named in place, Snakemake would retrain it
    # under the changed backbone first (its params changed), and the two would fit again
    held = tmp_path / "held" / "model.pt"
    held.parent.mkdir()
    shutil.copy(tmp_path / model, held)
    lookalike = tiny_config()
    lookalike["backbones"]["filterbank"]["options"] = {"patch_size": 16}
    wrong = snakemake(
        tmp_path,
        "predict",
        "--config",
        f"predict={{images: new, pixel_size_nm: [5.0, 5.0], name: wrong, model: {held}}}",
        configfile=write_config(tmp_path / "lookalike.yaml", lookalike),
        check=False,
    )
    log = (tmp_path / "results/logs/predict/wrong.log").read_text()
    assert wrong.returncode != 0 and "patch_size 8, and backbone 'filterbank' gives 16" in log, log[-2000:]
    assert "rule train_head" not in wrong.stdout + wrong.stderr
    assert not (tmp_path / "results/predictions/wrong").exists()
    # a model trained with an alignment variant is applied with it (statistics from the images given)
    aligned = tiny_config()
    aligned["alignment"] = {"variants": ["none", "percentile"]}
    configfile = write_config(tmp_path / "aligned.yaml", aligned)
    snakemake(
        tmp_path,
        "predict",
        "--config",
        "predict={images: new, pixel_size_nm: [5.0, 5.0], alignment: percentile, name: aligned}",
        configfile=configfile,
    )
    summary = json.loads((tmp_path / "results/predictions/aligned/predictions.json").read_text())
    assert summary["alignment"] == "percentile" and summary["view"].endswith("-percentile")
    assert summary["alignment_statistics"] == "the images given"
    assert (tmp_path / "results/models/filterbank/head/fibsem/percentile/seed0/model.pt").is_file()


def test_common_pixel_size_gives_views_of_their_own(tmp_path):
    """A dry run of the demo at 5 nm: the tiles' view carries the size, and the wildcards accept it."""
    result = snakemake(tmp_path, "-n", "--config", "tiling={pixel_size_nm: 5.0}")
    views = set(re.findall(r"results/tiles/([^/\s]+)/", result.stdout + result.stderr))
    assert views == {"tile112o16nm5"}, views


def test_predict_names_an_alignment_the_workflow_does_not_train():
    from em_foundation.config import ConfigError, validate_config
    from em_foundation.grid import predict_run

    config = tiny_config()
    config["alignment"] = {"variants": ["none", "percentile"]}
    config["predict"] = {"images": "new", "alignment": "percentile"}
    assert predict_run(validate_config(config))["alignment"] == "percentile"
    config["predict"]["alignment"] = "histmatch"
    with pytest.raises(ConfigError, match="predict.alignment 'histmatch': the workflow trains head/fibsem with none"):
        validate_config(config)
    config["predict"]["model"] = "elsewhere/model.pt"  # a model file of its own: its alignment is the user's word
    assert predict_run(validate_config(config))["alignment"] == "histmatch"


def test_a_wrong_model_in_predict_stops_at_start_up_and_an_unused_block_never_does():
    from em_foundation.config import ConfigError, validate_config
    from em_foundation.grid import predict_run

    config = tiny_config()
    config["predict"] = {"images": "new", "regime": "lora"}
    with pytest.raises(ConfigError, match="predict.regime 'lora': backbone 'filterbank' runs head"):
        validate_config(config)
    config["predict"] = {"regime": "lora"}  # no images: the target is not in use
    assert predict_run(validate_config(config))["name"] == "unset"


class Brightness(torch.nn.Module):
    """A stand-in model with a known answer: foreground probability = sigmoid(20 * (pixel - 0.5))."""

    def forward(self, pixels: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        x = 10.0 * (pixels - 0.5)
        return torch.cat([-x, x], dim=1)


@pytest.mark.parametrize("view, resampled", [("tile32o8", False), ("tile32o8nm10", True)])
def test_predict_images_maps_back_to_the_native_grid(tmp_path, view, resampled):
    """Exact at native resolution; at half resolution only the block edges may differ."""
    from em_foundation.predict import predict_images

    rng = np.random.default_rng(2)
    image = np.kron(rng.integers(0, 2, (5, 6)) * 200 + 20, np.ones((16, 16))).astype(np.uint8)[:70, :90]
    out = tmp_path / "out"
    result = predict_images(Brightness(), None, [("x", image)], parse_view(view), out, (5.0, 5.0), torch.device("cpu"))
    probability = tifffile.imread(out / "x_probability.tif")
    expected = 1 / (1 + np.exp(-20 * (image / 255.0 - 0.5)))
    mask = tifffile.imread(out / "x_mask.tif")
    assert probability.shape == mask.shape == image.shape
    if resampled:
        assert np.abs(probability - expected).mean() < 0.05
        assert ((mask == 255) == (image > 127)).mean() > 0.95
    else:
        np.testing.assert_allclose(probability, expected, atol=1e-5)
        np.testing.assert_array_equal(mask == 255, image > 127)
    assert result["images"][0]["foreground_fraction"] == pytest.approx((mask == 255).mean())


def test_predict_images_normalises_intensity_with_the_images_statistics(tmp_path):
    """A percentile-aligned model sees the images given stretched by their own pooled percentiles."""
    from em_foundation.alignment import intensity_bounds, percentile_normalise
    from em_foundation.predict import predict_images

    rng = np.random.default_rng(3)
    images = [
        ("a", rng.integers(60, 111, (40, 48), dtype=np.uint8)),
        ("b", rng.integers(50, 101, (40, 48), dtype=np.uint8)),
    ]
    cpu = torch.device("cpu")
    predict_images(
        Brightness(),
        None,
        images,
        parse_view("tile32o8-percentile"),
        tmp_path / "p",
        (5.0, 5.0),
        cpu,
        alignment="percentile",
    )
    bounds = intensity_bounds(np.concatenate([image.ravel() for _, image in images]), 1.0, 99.0)
    for name, image in images:
        stretched = percentile_normalise(image, bounds=bounds)
        expected = 1 / (1 + np.exp(-20 * (stretched / 255.0 - 0.5)))
        np.testing.assert_allclose(tifffile.imread(tmp_path / f"p/{name}_probability.tif"), expected, atol=1e-5)
    unaligned = predict_images(Brightness(), None, images, parse_view("tile32o8"), tmp_path / "u", (5.0, 5.0), cpu)
    assert all(entry["foreground_fraction"] == 0 for entry in unaligned["images"])  # every pixel below mid-grey


class BatchNormSpy(torch.nn.Module):
    """Records what it is fed in evaluation mode; a batch-norm layer whose statistics AdaBN re-estimates."""

    seen: list[torch.Tensor] = []  # a class attribute: shared with the copy adapt_batchnorm makes

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(channels)

    def forward(self, tokens: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        if not self.norm.training:
            BatchNormSpy.seen.append(tokens.float())
        x = self.norm(tokens.float())[:, -2:]  # the filter bank's smallest-variance channels
        return torch.nn.functional.interpolate(x, size=out_size, mode="bilinear", align_corners=False)


def test_predict_images_standardises_tokens_and_adapts_batchnorm_over_all_images(tmp_path):
    """featstd-adabn: tokens standardised with, and batch norm re-estimated on, every image given."""
    from em_foundation.alignment import domain_stats, standardise
    from em_foundation.backbones import build_backbone
    from em_foundation.predict import model_inputs, predict_images

    backbone = build_backbone({"family": "filterbank", "options": {"patch_size": 8}})
    rng = np.random.default_rng(4)
    images = [(name, rng.integers(0, 256, (48, 64), dtype=np.uint8)) for name in "abc"]
    spy = BatchNormSpy(backbone.embed_dim)
    BatchNormSpy.seen.clear()
    cpu = torch.device("cpu")
    predict_images(
        spy, backbone, images, parse_view("tile32o8"), tmp_path / "out", (5.0, 5.0), cpu, alignment="featstd-adabn"
    )
    fed = torch.cat(BatchNormSpy.seen)  # every tile of every image, once, standardised
    raw = torch.cat(
        [model_inputs(tile_image(image, parse_view("tile32o8"), (5.0, 5.0)), backbone, 8, cpu) for _, image in images]
    )
    assert fed.shape == raw.shape and fed.shape[0] == 3 * 6
    expected = standardise(raw.numpy(), domain_stats(raw.numpy()), dtype=np.float16)
    np.testing.assert_allclose(fed.numpy(), expected.astype(np.float32))
    assert spy.norm.running_mean.abs().max() == 0  # the model given is untouched: AdaBN adapts a copy
    predict_images(
        spy, backbone, images, parse_view("tile32o8"), tmp_path / "std", (5.0, 5.0), cpu, alignment="featstd"
    )
    adapted, plain = (tifffile.imread(tmp_path / f"{out}/a_probability.tif") for out in ("out", "std"))
    assert np.abs(adapted - plain).max() > 1e-3  # re-estimated batch-norm statistics change the prediction
    with pytest.raises(ValueError, match="featstd standardises cached tokens"):
        predict_images(
            Brightness(), None, images, parse_view("tile32o8"), tmp_path / "px", (5.0, 5.0), cpu, alignment="featstd"
        )


def test_two_images_with_one_name_are_refused_naming_both(tmp_path):
    for name in ("a.png", "a.tif"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    with pytest.raises(ValueError, match=r"a\.png and .*a\.tif have one name 'a'"):
        read_unlabelled(tmp_path)


def test_a_model_for_another_backbone_or_regime_is_refused_naming_both():
    """What model.pt records (regime, spec, patch size, token channels, weights) against the config."""
    from em_foundation.backbones import build_backbone
    from em_foundation.predict import check_model_fits

    patch8 = build_backbone({"family": "filterbank", "options": {"patch_size": 8}})
    patch16 = build_backbone({"family": "filterbank", "options": {"patch_size": 16}})
    head = {
        "regime": "head",
        "patch_size": 8,
        "in_channels": patch8.embed_dim,
        "config": {"backbone_name": "filterbank", "backbone": {}, "weights_identity": {"fibsem": patch8.identity}},
    }
    spec = {"family": "filterbank", "options": {"patch_size": 16}}
    check_model_fits("m.pt", head, "head", "filterbank", {"family": "filterbank"}, patch8)  # fits: no error
    with pytest.raises(ValueError, match="m.pt .*patch_size 8, and backbone 'filterbank' gives 16"):
        check_model_fits("m.pt", head, "head", "filterbank", spec, patch16)
    vit = {**head, "in_channels": 48, "patch_size": 14, "config": {"backbone_name": "tinyvit", "backbone": {}}}
    with pytest.raises(ValueError, match=f"in_channels 48, and backbone 'filterbank' gives {patch8.embed_dim}"):
        check_model_fits("m.pt", vit, "head", "filterbank", {"family": "filterbank"}, patch8)
    lora = {"regime": "lora", "config": {"backbone_name": "tinyvit", "backbone": {"family": "dinov2", "layers": [-1]}}}
    with pytest.raises(ValueError, match="it is a 'lora' model, and predict.regime is 'head'"):
        check_model_fits("m.pt", lora, "head", "tinyvit", {"family": "dinov2", "layers": [-1]}, None)
    with pytest.raises(ValueError, match=r"trained with layers \[-1\], and backbones.tinyvit.layers is \[-2\]"):
        check_model_fits("m.pt", lora, "lora", "tinyvit", {"family": "dinov2", "layers": [-2]}, None)
    pixel = {"regime": "pixelforest", "features": {"token_channels": 48}, "config": {"backbone_name": "tinyvit"}}
    with pytest.raises(ValueError, match="48 token channels per pixel, and backbone 'filterbank' gives 0"):
        check_model_fits("m.pt", pixel, "pixelforest", "filterbank", {"family": "filterbank"}, None)
