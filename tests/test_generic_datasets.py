"""The generic converters ``volume`` and ``folder``: each reader, each bad input, and equivalence
with the dedicated converters (the demo's synthetic data, and the VNC archive when present).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from em_foundation.config import ConfigError
from em_foundation.data.convert import prepare_dataset
from em_foundation.data.generic import STRETCH_PERCENTILES
from em_foundation.data.prepared import IGNORE_LABEL, pixel_size_of, read_attrs, read_split
from tests.test_em_datasets import VNC_ZIP, assert_fails_cleanly, prepare, spec_for

N, H, W = 8, 24, 32


def volumes(seed: int = 0, n: int = N, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """A random image stack and an instance-label stack (values 0, 1..3) with foreground on every slice."""
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 4095
    images = rng.integers(0, top + 1, size=(n, H, W)).astype(dtype)
    labels = np.zeros((n, H, W), dtype=np.uint16)
    for z in range(n):
        labels[z, 2 : 6 + z, 3:9] = 1 + z % 3
    return images, labels


def expected_classes(labels: np.ndarray) -> np.ndarray:
    return (labels > 0).astype(np.uint8)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Local paths are relative to the working directory: run each test inside its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def volume_spec(**options) -> dict:
    return spec_for("volume", **{"pixel_size_nm": [5.0, 5.0], **options})


def folder_spec(**options) -> dict:
    return spec_for(
        "folder",
        **{
            "pixel_size_nm": 6.0,
            "train": {"images": "train/img", "labels": "train/lab"},
            "test": {"images": "test/img", "labels": "test/lab"},
            **options,
        },
    )


def write_folders(root: Path, images: np.ndarray, labels: np.ndarray, n_test: int = 2, suffix: str = ".png") -> None:
    """Images as img_<z>.tif, labels as <z>_mask<suffix>: paired by number, not by name."""
    for split, indices in (("train", range(len(images) - n_test)), ("test", range(len(images) - n_test, len(images)))):
        (root / split / "img").mkdir(parents=True)
        (root / split / "lab").mkdir(parents=True)
        for z in indices:
            tifffile.imwrite(root / split / "img" / f"img_{z:03d}.tif", images[z])
            if suffix == ".png":
                Image.fromarray(labels[z].astype(np.uint8)).save(root / split / "lab" / f"mask_{z}.png")
            else:
                tifffile.imwrite(root / split / "lab" / f"mask_{z}{suffix}", labels[z])


def assert_prepared(out_h5: Path, images: np.ndarray, classes: np.ndarray, test: range) -> None:
    train_idx = [z for z in range(len(images)) if z not in test]
    for split, indices in (("train", train_idx), ("test", list(test))):
        prepared = read_split(out_h5, split)
        np.testing.assert_array_equal(prepared.raw, images[indices])
        np.testing.assert_array_equal(prepared.labels, classes[indices])


# --- readers --------------------------------------------------------------------------


def test_volume_tiff_stack_with_test_slices_and_instance_labels(in_tmp):
    images, labels = volumes()
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels)
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="5:8")
    report, out_h5, out_report = prepare(in_tmp, "mine", spec, None)
    assert_prepared(out_h5, images, expected_classes(labels), range(5, 8))
    assert read_split(out_h5, "test").names == ["5", "6", "7"]
    assert report["splits"]["test"]["slices"][0]["source"] == "raw.tif[5]|mito.tif[5]"
    assert report["pixel_size_nm"] == [5.0, 5.0] and report["intensity_stretch"]["applied"] is False
    assert json.loads(out_report.read_text())["split_info"]["test_slices"] == "range(5, 8)"
    assert pixel_size_of(out_h5) == (5.0, 5.0)


def test_volume_hdf5_pairs_of_files(in_tmp):
    images, labels = volumes()
    for split, part in (("train", slice(0, 6)), ("test", slice(6, 8))):
        with h5py.File(in_tmp / f"{split}.h5", "w") as handle:
            handle.create_dataset("volumes/raw", data=images[part])
            handle.create_dataset("volumes/labels/mito", data=labels[part])
    spec = volume_spec(
        train={"images": "train.h5:volumes/raw", "labels": "train.h5:volumes/labels/mito"},
        test={"images": "test.h5:volumes/raw", "labels": "test.h5:volumes/labels/mito"},
    )
    _, out_h5, _ = prepare(in_tmp, "mine", spec, None)
    np.testing.assert_array_equal(read_split(out_h5, "train").raw, images[:6])
    np.testing.assert_array_equal(read_split(out_h5, "test").labels, expected_classes(labels[6:]))


def test_volume_hdf5_missing_dataset_names_what_is_there(in_tmp):
    images, labels = volumes()
    with h5py.File(in_tmp / "v.h5", "w") as handle:
        handle.create_dataset("raw", data=images)
        handle.create_dataset("mito", data=labels)
    spec = volume_spec(images="v.h5:raw", labels="v.h5:labels", test_slices="6:8")
    assert_fails_cleanly(in_tmp, "mine", spec, None, "no dataset 'labels'", "v.h5", "mito", "dataset 'mine'")


def test_volume_zarr_array(in_tmp):
    zarr = pytest.importorskip("zarr", reason="zarr is a dependency; install the package to test the Zarr reader")
    images, labels = volumes()
    root = zarr.open_group(str(in_tmp / "v.zarr"), mode="w")
    root.create_array("raw", data=images) if hasattr(root, "create_array") else root.array("raw", images)
    root.create_array("mito", data=labels) if hasattr(root, "create_array") else root.array("mito", labels)
    spec = volume_spec(images="v.zarr:raw", labels="v.zarr:mito", test_slices="0:2")
    _, out_h5, _ = prepare(in_tmp, "mine", spec, None)
    assert_prepared(out_h5, images, expected_classes(labels), range(0, 2))


def test_volume_inside_an_archive(in_tmp):
    images, labels = volumes()
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels)
    archive = in_tmp / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(in_tmp / "raw.tif", "data/raw.tif")
        zf.write(in_tmp / "mito.tif", "data/mito.tif")
    os.remove(in_tmp / "raw.tif")
    spec = volume_spec(images="data/raw.tif", labels="data/mito.tif", test_slices="6:8")
    report, out_h5, _ = prepare(in_tmp, "mine", spec, archive)
    assert_prepared(out_h5, images, expected_classes(labels), range(6, 8))
    assert report["archive"]["sha256"]


def test_sixteen_bit_images_are_stretched_by_the_training_percentiles(in_tmp):
    images, labels = volumes(dtype=np.uint16)
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels)
    report, out_h5, _ = prepare(
        in_tmp, "mine", volume_spec(images="raw.tif", labels="mito.tif", test_slices="6:8"), None
    )
    stretch = report["intensity_stretch"]
    lo, hi = np.percentile(images[:6].astype(np.float64), STRETCH_PERCENTILES)
    assert stretch["applied"] and stretch["source_dtype"] == "uint16" and stretch["bounds"] == pytest.approx([lo, hi])
    expected = np.clip(np.round((images.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_split(out_h5, "test").raw, expected[6:])
    assert json.loads(read_attrs(out_h5)["intensity_stretch"])["bounds"] == pytest.approx([lo, hi])


def test_ignore_value_and_listed_foreground(in_tmp):
    images, labels = volumes()
    labels = np.where(labels > 0, 255, 0).astype(np.uint8)
    labels[:, -4:, -4:] = 7  # unlabelled corner
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels)
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="6:8", foreground=[255], ignore_value=7)
    report, out_h5, _ = prepare(in_tmp, "mine", spec, None)
    prepared = read_split(out_h5, "train")
    assert (prepared.labels[:, -4:, -4:] == IGNORE_LABEL).all()
    np.testing.assert_array_equal(prepared.labels[:, :-4, :], (labels[:6, :-4, :] == 255).astype(np.uint8))
    assert report["splits"]["train"]["label_counts"][str(IGNORE_LABEL)] == 6 * 16


@pytest.mark.parametrize("pair_by", ["number", "stem"])
def test_folders_paired_by_number_or_stem(in_tmp, pair_by):
    images, labels = volumes()
    labels = np.where(labels > 0, 255, 0).astype(np.uint8)
    write_folders(in_tmp, images, labels)
    if pair_by == "stem":  # same stems, different suffixes
        for path in in_tmp.glob("*/lab/mask_*.png"):
            z = int(path.stem.split("_")[1])
            path.rename(path.with_name(f"img_{z:03d}.png"))
    report, out_h5, _ = prepare(in_tmp, "mine", folder_spec(pair_by=pair_by, foreground=[255]), None)
    assert_prepared(out_h5, images, (labels == 255).astype(np.uint8), range(6, 8))
    names = read_split(out_h5, "test").names
    assert names == (["6", "7"] if pair_by == "number" else ["img_006", "img_007"])
    assert report["splits"]["test"]["slices"][0]["source"].startswith("test/img/img_006.tif|test/lab/")
    assert pixel_size_of(out_h5) == (6.0, 6.0)


def test_folder_mixes_one_bit_and_eight_bit_masks_and_sixteen_bit_images(in_tmp):
    images, labels = volumes(dtype=np.uint16)
    masks = np.where(labels > 0, 255, 0).astype(np.uint8)
    write_folders(in_tmp, images, masks)
    Image.fromarray(masks[0] > 0).convert("1").save(in_tmp / "train" / "lab" / "mask_0.png")  # 1-bit
    report, out_h5, _ = prepare(in_tmp, "mine", folder_spec(foreground=[255]), None)
    np.testing.assert_array_equal(read_split(out_h5, "train").labels, (masks[:6] > 0).astype(np.uint8))
    assert report["intensity_stretch"]["source_dtype"] == "uint16"


# --- bad inputs -----------------------------------------------------------------------


def test_shape_mismatch(in_tmp):
    images, labels = volumes()
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels[:, :, :-1])
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="6:8")
    assert_fails_cleanly(in_tmp, "mine", spec, None, "shape (8, 24, 32)", "(8, 24, 31)", "raw.tif", "mito.tif")


def test_folder_shape_mismatch_names_the_pair(in_tmp):
    images, labels = volumes()
    write_folders(in_tmp, images, labels)
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(in_tmp / "train" / "lab" / "mask_3.png")
    assert_fails_cleanly(in_tmp, "mine", folder_spec(), None, "differs from image shape", "mask_3.png", "img_003.tif")


def test_unpaired_file(in_tmp):
    images, labels = volumes()
    write_folders(in_tmp, images, labels)
    os.remove(in_tmp / "test" / "lab" / "mask_7.png")
    assert_fails_cleanly(in_tmp, "mine", folder_spec(), None, "1 image(s) without a label", "img_007.tif")


def test_duplicate_file(in_tmp):
    images, labels = volumes()
    write_folders(in_tmp, images, labels)
    tifffile.imwrite(in_tmp / "train" / "img" / "copy_of_3.tif", images[3])
    assert_fails_cleanly(in_tmp, "mine", folder_spec(), None, "two files with the pairing key 3", "copy_of_3.tif")


def test_empty_foreground(in_tmp):
    """Masks that are all background (or a foreground value that never occurs) stop the run."""
    images, labels = volumes()
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", np.zeros_like(labels))
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="6:8", foreground=[9])
    assert_fails_cleanly(in_tmp, "mine", spec, None, "split 'train' has no foreground pixel", "options.foreground")


def test_label_values_outside_the_declared_ones(in_tmp):
    images, labels = volumes()
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels)
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="6:8", foreground=[1])
    assert_fails_cleanly(in_tmp, "mine", spec, None, "outside the declared ones (0, 1): 2", "mito.tif[1]", "slice 1")


def test_missing_local_file_says_where_paths_are_taken_from(in_tmp):
    spec = volume_spec(images="nowhere.tif", labels="mito.tif", test_slices="6:8")
    assert_fails_cleanly(in_tmp, "mine", spec, None, "'nowhere.tif' does not exist", "working directory")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"images": "a.tif"}, "give either train"),
        ({"pixel_size_nm": [0, 5]}, "pixel_size_nm"),
        ({"images": "a.tif", "labels": "b.tif", "test_slices": "1:2", "foreground": "all"}, "foreground"),
    ],
)
def test_bad_options_are_named(in_tmp, options, fragment):
    assert_fails_cleanly(in_tmp, "mine", volume_spec(**options), None, fragment, "datasets.mine", error=ConfigError)


def test_colour_tiff_is_not_taken_for_a_stack(in_tmp):
    tifffile.imwrite(in_tmp / "raw.tif", np.zeros((H, W, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(in_tmp / "mito.tif", np.zeros((H, W, 3), np.uint8), photometric="rgb")
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="0:1")
    assert_fails_cleanly(in_tmp, "mine", spec, None, "'raw.tif' is a colour image", "grayscale")


def test_test_slices_outside_the_volume(in_tmp):
    images, labels = volumes()
    tifffile.imwrite(in_tmp / "raw.tif", images)
    tifffile.imwrite(in_tmp / "mito.tif", labels)
    spec = volume_spec(images="raw.tif", labels="mito.tif", test_slices="6:80")
    assert_fails_cleanly(in_tmp, "mine", spec, None, "test_slices is '6:80'", "<= 8", error=ConfigError)


# --- the same arrays as the dedicated converters --------------------------------------


def reexport_and_compare(in_tmp: Path, reference_h5: Path, foreground: list[int]) -> None:
    """Write each split of a prepared file as TIFF stacks and as folders; both must read back the same."""
    splits = {s: read_split(reference_h5, s) for s in ("train", "test")}
    stacks = {}
    for split, data in splits.items():
        labels = np.where(data.labels == 1, foreground[0], 0).astype(np.uint8)
        tifffile.imwrite(in_tmp / f"{split}_raw.tif", data.raw, photometric="minisblack")
        tifffile.imwrite(in_tmp / f"{split}_mito.tif", labels, photometric="minisblack")
        stacks[split] = {"images": f"{split}_raw.tif", "labels": f"{split}_mito.tif"}
        for kind in ("img", "lab"):
            (in_tmp / split / kind).mkdir(parents=True)
        for name, raw, label in zip(data.names, data.raw, labels):
            Image.fromarray(raw).save(in_tmp / split / "img" / f"{name}.png")
            Image.fromarray(label).save(in_tmp / split / "lab" / f"{name}.png")
    pixel = list(pixel_size_of(reference_h5))
    for converter, options in (
        ("volume", {**stacks}),
        ("folder", {"pair_by": "number", **{s: {"images": f"{s}/img", "labels": f"{s}/lab"} for s in splits}}),
    ):
        spec = spec_for(converter, foreground=foreground, pixel_size_nm=pixel, **options)
        out_h5, out_report = in_tmp / converter / "x.h5", in_tmp / converter / "x.json"
        prepare_dataset("mine", spec, None, out_h5, out_report)
        for split, data in splits.items():
            again = read_split(out_h5, split)
            # folders come back in numeric order, the reference keeps its converter's order (VNC: shuffled)
            order = (
                [again.names.index(str(int(name))) for name in data.names]
                if converter == "folder"
                else list(range(len(data.names)))
            )
            assert len(again.names) == len(data.names)
            np.testing.assert_array_equal(again.raw[order], data.raw, err_msg=f"{converter} {split} raw")
            np.testing.assert_array_equal(again.labels[order], data.labels, err_msg=f"{converter} {split} labels")
        assert pixel_size_of(out_h5) == tuple(pixel)


def test_demo_synthetic_data_reexported_gives_the_same_arrays(in_tmp):
    spec = spec_for("synthetic", domain="sstem", n_train=4, n_test=2, height=64, width=64, seed=3)
    _, reference, _ = prepare(in_tmp, "demo", spec, None)
    assert pixel_size_of(reference) == (4.6, 4.6)
    reexport_and_compare(in_tmp, reference, [1])


def test_vnc_archive_reexported_gives_the_same_arrays(in_tmp, shared_data):
    archive = shared_data(VNC_ZIP)
    _, reference, _ = prepare(in_tmp, "vnc", spec_for("vnc"), archive)
    assert pixel_size_of(reference) == (4.6, 4.6)
    reexport_and_compare(in_tmp, reference, [255])


def test_config_check_at_start_up_names_a_missing_pixel_size():
    from em_foundation.config import validate_config
    from tests.test_config import demo_config

    config = demo_config()
    config["datasets"]["fibsem"] = {"converter": "folder", "options": {"train": {"images": "a", "labels": "b"}}}
    with pytest.raises(ConfigError, match=r"datasets\.fibsem\.options needs pixel_size_nm for converter 'folder'"):
        validate_config(config)


def test_one_page_tiff_of_shape_1_h_w_is_read_as_a_2d_image(in_tmp):
    images, labels = volumes()
    write_folders(in_tmp, images, labels)
    tifffile.imwrite(in_tmp / "train" / "img" / "img_002.tif", images[2][None])  # (1, H, W), as Fiji may save
    report, out_h5, _ = prepare(in_tmp, "mine", folder_spec(), None)
    assert_prepared(out_h5, images, expected_classes(labels), range(6, 8))


def test_a_bar_in_a_file_name_keeps_image_and_label_apart(in_tmp):
    images, labels = volumes()
    write_folders(in_tmp, images, labels)
    os.rename(in_tmp / "train" / "img" / "img_001.tif", in_tmp / "train" / "img" / "img|001.tif")
    report, out_h5, _ = prepare(in_tmp, "mine", folder_spec(), None)
    assert_prepared(out_h5, images, expected_classes(labels), range(6, 8))
    assert "train/img/img|001.tif|train/lab/mask_1.png" in read_split(out_h5, "train").sources


def test_images_of_different_sizes_in_one_split_name_the_rule_and_the_files(in_tmp):
    """One size per split (README, 'Your own data'): the error says so, names the odd files and the way out."""
    images, labels = volumes()
    write_folders(in_tmp, images, labels)
    tifffile.imwrite(in_tmp / "train" / "img" / "img_004.tif", np.zeros((H + 8, W), np.uint8))
    Image.fromarray(np.ones((H + 8, W), np.uint8)).save(in_tmp / "train" / "lab" / "mask_4.png")
    assert_fails_cleanly(
        in_tmp, "mine", folder_spec(), None, "must have one size", f"img_004.tif {H + 8}×{W}", "a dataset of its own"
    )


@pytest.mark.parametrize("native, key", [(500.0, "tiling"), (0.05, "tiling"), (500.0, "alignment")])
def test_a_resampling_far_beyond_any_real_pixel_size_stops_at_start_up(native, key):
    from em_foundation.config import validate_config
    from tests.test_config import demo_config

    config = demo_config()
    config["datasets"]["fibsem"] = {"converter": "folder", "options": folder_spec(pixel_size_nm=native)["options"]}
    if key == "tiling":
        config["tiling"]["pixel_size_nm"] = 5
    else:
        config["alignment"] = {"variants": ["none", "rescale"], "pixel_size_nm": 5}
    with pytest.raises(
        ConfigError, match=rf"pixel size \[{native}, {native}\] nm and {key}.pixel_size_nm is 5 nm.* GiB"
    ):
        validate_config(config)
    config["datasets"]["fibsem"]["options"]["pixel_size_nm"] = 6.0  # a real pair: fine
    validate_config(config)
