"""Real-data converters: Lucchi++, Drosophila VNC (local copies of the real archives), Kasthuri++
(a synthetic archive in its layout), end to end from download() to the prepared HDF5, and
every integrity check on deliberately broken archives."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

import em_foundation.data.em_datasets  # noqa: F401  (registers the converters)
from em_foundation.config import ConfigError
from em_foundation.data.convert import prepare_dataset
from em_foundation.data.download import download
from em_foundation.data.integrity import IntegrityError
from em_foundation.data.prepared import IGNORE_LABEL, read_attrs, read_split

# Checksums of the local copies (../shared/data/README.md), not of the real downloads.
VNC_ZIP = "groundtruth-drosophila-vnc-master.zip"
VNC_SHA = "6763f2a91af1fc21f334dbe0ed88fe50bed5aec546426f2f8a3762667a9ad309"
LUCCHI_ZIP = "lucchi_pp_subset.zip"
LUCCHI_SHA = "3bd95bb2f1195af7c2bd0e264689579f2c5ec286b41b72b1b69256156a61ddcd"
LUCCHI_SLICES = 20  # the subset keeps slices 0-19 of each split


def spec_for(
    converter: str,
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    **options,
) -> dict:
    """A dataset entry as the validated config holds it (every key present)."""
    return {
        "converter": converter,
        "url": url,
        "sha256": sha256,
        "foreground_fraction": list(bounds),
        "options": options,
    }


def prepare(tmp_path: Path, name: str, spec: dict, archive: Optional[Path]) -> tuple[dict, Path, Path]:
    out_h5, out_report = tmp_path / "prepared" / f"{name}.h5", tmp_path / "prepared" / f"{name}.integrity.json"
    report = prepare_dataset(name, spec, archive, out_h5, out_report)
    return report, out_h5, out_report


def assert_fails_cleanly(
    tmp_path: Path, name: str, spec: dict, archive: Optional[Path], *fragments: str, error: type = IntegrityError
) -> str:
    """prepare_dataset raises ``error`` whose message has every fragment, and writes nothing."""
    with pytest.raises(error) as caught:
        prepare(tmp_path, name, spec, archive)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    out_dir = tmp_path / "prepared"
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], "a failed preparation left files"
    return message


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rewrite_zip(
    source: Path,
    dest: Path,
    keep: Callable[[str], bool] = lambda n: True,
    replace: Optional[dict[str, bytes]] = None,
    rename: Callable[[str], str] = lambda n: n,
) -> Path:
    """Copy the members ``keep`` selects (stored, for speed), swapping in ``replace``'s bytes."""
    replace = dict(replace or {})
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if info.is_dir() or not keep(info.filename):
                continue
            out.writestr(rename(info.filename), replace.pop(info.filename, None) or src.read(info))
        for name, data in replace.items():  # members that were not in the source: added
            out.writestr(name, data)
    return dest


def slice_number(member: str) -> int:
    return int("".join(c for c in member.rsplit("/", 1)[-1] if c.isdigit()))


@pytest.fixture(scope="module")
def lucchi_zip(shared_data) -> Path:
    return shared_data(LUCCHI_ZIP)


@pytest.fixture(scope="module")
def vnc_zip(shared_data) -> Path:
    return shared_data(VNC_ZIP)


@pytest.fixture
def mini_lucchi(lucchi_zip: Path, tmp_path: Path) -> Callable[..., Path]:
    """Build a 3-slice-per-split Lucchi++ archive, optionally broken, in tmp_path."""

    def build(replace: Optional[dict[str, bytes]] = None, drop: tuple[str, ...] = (), name: str = "mini.zip") -> Path:
        keep = lambda m: slice_number(m) <= 2 and m not in drop  # noqa: E731
        return rewrite_zip(lucchi_zip, tmp_path / name, keep=keep, replace=replace)

    return build


def read_png(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(archive.read(member))))


# --- end to end: download() then prepare_dataset() ------------------------------------


@pytest.mark.parametrize("transport", ["file", "http"])
@pytest.mark.parametrize(
    "name, converter, filename, sha",
    [("vnc", "vnc", VNC_ZIP, VNC_SHA), ("lucchi", "lucchi_pp", LUCCHI_ZIP, LUCCHI_SHA)],
)
def test_download_then_prepare(transport, name, converter, filename, sha, shared_data, http_server, tmp_path):
    source = shared_data(filename)
    url = source.as_uri() if transport == "file" else http_server(source.parent).url(filename)
    archive = download(url, sha, tmp_path / "downloads" / f"{name}.zip", retries=1, backoff=0.001)
    report, out_h5, out_report = prepare(tmp_path, name, spec_for(converter, url, sha), archive)

    assert json.loads(out_report.read_text()) == json.loads(json.dumps(report))
    assert report["status"] == "passed"
    assert report["archive"]["sha256"] == sha and report["archive"]["sha256_matches_config"] is True
    expected = {"vnc": {"train": 17, "test": 3}, "lucchi": {"train": LUCCHI_SLICES, "test": LUCCHI_SLICES}}[name]
    assert {s: info["n_slices"] for s, info in report["splits"].items()} == expected
    attrs = read_attrs(out_h5)
    assert attrs["dataset"] == name and attrs["sha256"] == sha and attrs["url"] == url
    assert attrs["licence"] and attrs["citation"] and json.loads(attrs["voxel_size_nm"])
    print(f"{name} via {transport}: converted in {report['conversion_seconds']:.2f} s")


# --- Lucchi++ -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lucchi_prepared(lucchi_zip: Path, tmp_path_factory) -> tuple[dict, Path]:
    report, out_h5, _ = prepare(tmp_path_factory.mktemp("lucchi"), "lucchi", spec_for("lucchi_pp"), lucchi_zip)
    return report, out_h5


@pytest.mark.parametrize("split, folder", [("train", "Train"), ("test", "Test")])
def test_lucchi_labels_match_the_png_with_the_same_slice_number(lucchi_prepared, lucchi_zip, split, folder):
    """The guard against the study's sorted-name pairing bug: read every PNG independently."""
    _, out_h5 = lucchi_prepared
    prepared = read_split(out_h5, split)
    assert prepared.names == [str(i) for i in range(LUCCHI_SLICES)]  # numeric order, not "0, 1, 10, 11, ..."
    with zipfile.ZipFile(lucchi_zip) as zf:
        for index, name in enumerate(prepared.names):
            image = read_png(zf, f"Lucchi++/{folder}_In/mask{int(name):04d}.png")
            label = read_png(zf, f"Lucchi++/{folder}_Out/{name}.png")
            gray = label[..., 0] if label.ndim == 3 else label  # test labels are RGBA
            np.testing.assert_array_equal(prepared.raw[index], image)
            np.testing.assert_array_equal(prepared.labels[index], (gray == 255).astype(np.uint8))
            assert prepared.sources[index] == (
                f"Lucchi++/{folder}_In/mask{int(name):04d}.png|Lucchi++/{folder}_Out/{name}.png"
            )
    assert prepared.raw.shape == (LUCCHI_SLICES, 768, 1024)


def test_lucchi_foreground_is_plausible(lucchi_prepared):
    report, _ = lucchi_prepared
    for split in ("train", "test"):
        info = report["splits"][split]
        assert set(info["label_counts"]) == {"0", "1"}
        assert 0.05 < info["foreground_fraction_mean"] < 0.15, info["foreground_fraction_mean"]
        print(
            f"lucchi subset {split}: foreground mean {info['foreground_fraction_mean']:.4f} "
            f"[{info['foreground_fraction_min']:.4f}, {info['foreground_fraction_max']:.4f}]"
        )


# --- VNC ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vnc_prepared(vnc_zip: Path, tmp_path_factory) -> tuple[dict, Path]:
    spec = spec_for("vnc", bounds=(0.02, 0.12))
    report, out_h5, _ = prepare(tmp_path_factory.mktemp("vnc"), "vnc", spec, vnc_zip)
    return report, out_h5


def test_vnc_masks_are_binary_with_the_documented_foreground(vnc_prepared):
    report, out_h5 = vnc_prepared
    splits = {s: read_split(out_h5, s) for s in ("train", "test")}
    labels = np.concatenate([s.labels for s in splits.values()])
    assert labels.shape == (20, 1024, 1024) and set(np.unique(labels)) == {0, 1}
    fractions = labels.reshape(20, -1).mean(axis=1)
    assert 0.035 < fractions.min() and fractions.max() < 0.08, fractions  # README: about 4-7.5 %
    assert abs(fractions.mean() - 0.054) < 0.003, fractions.mean()  # README: mean about 5.4 %
    reported = [s["foreground_fraction"] for split in report["splits"].values() for s in split["slices"]]
    assert sorted(reported) == pytest.approx(sorted(fractions.tolist()))
    print(
        f"vnc: foreground per slice {fractions.min():.4f}-{fractions.max():.4f}, mean {fractions.mean():.4f}; "
        f"content digest {report['content_digest']}"
    )


def test_vnc_split_is_seeded_and_recorded(vnc_prepared, vnc_zip, tmp_path):
    report, out_h5 = vnc_prepared
    names = [f"{i:02d}" for i in range(20)]
    drawn = np.random.default_rng(0).permutation(names)[:3]
    info = report["split_info"]
    assert info["split_seed"] == 0 and info["test"] == sorted(drawn.tolist())
    assert read_split(out_h5, "test").names == info["test"]
    assert read_split(out_h5, "train").names == [n for n in names if n not in info["test"]]
    assert json.loads(read_attrs(out_h5)["split"]) == info
    # another seed, another split, also recorded
    other, _, _ = prepare(tmp_path, "vnc", spec_for("vnc", split_seed=7, n_test=4), vnc_zip)
    assert other["split_info"]["split_seed"] == 7 and len(other["split_info"]["test"]) == 4
    assert other["split_info"]["test"] != info["test"]


def test_vnc_root_folder_name_may_vary(vnc_zip, tmp_path):
    """GitHub names the folder after the commit when the commit archive is pinned; the
    archive's sha256 changes with it, the content digest does not."""
    commit_root = "groundtruth-drosophila-vnc-4a5f051466d24d8dc1e855ab55658bb1b1dcd6bf/"
    keep = lambda m: ("/stack1/raw/" in m or "/stack1/mitochondria/" in m) and slice_number(m) < 5  # noqa: E731
    reports = {}
    for root in ("groundtruth-drosophila-vnc-master/", commit_root):
        small = rewrite_zip(vnc_zip, tmp_path / "vnc.zip", keep=keep, rename=lambda m: root + m.split("/", 1)[1])
        reports[root], out_h5, _ = prepare(tmp_path / root.strip("/"), "vnc", spec_for("vnc", n_test=1), small)
        assert read_attrs(out_h5)["archive_root"] == root
        assert reports[root]["splits"]["train"]["n_slices"] == 4
    master, commit = reports.values()
    assert master["archive"]["sha256"] != commit["archive"]["sha256"]
    assert master["content_digest"] == commit["content_digest"]


def test_vnc_image_in_the_label_folder_is_not_binary(vnc_zip, tmp_path):
    root = "groundtruth-drosophila-vnc-master/stack1/"
    with zipfile.ZipFile(vnc_zip) as zf:
        raw = np.asarray(Image.open(io.BytesIO(zf.read(f"{root}raw/02.tif"))))
    keep = lambda m: ("/stack1/raw/" in m or "/stack1/mitochondria/" in m) and slice_number(m) < 4  # noqa: E731
    broken = rewrite_zip(
        vnc_zip, tmp_path / "vnc.zip", keep=keep, replace={f"{root}mitochondria/02.png": png_bytes(raw)}
    )
    assert_fails_cleanly(
        tmp_path,
        "vnc",
        spec_for("vnc", n_test=1),
        broken,
        "dataset 'vnc'",
        "not binary",
        f"{root}mitochondria/02.png",
        "max_stray_fraction",
    )


# --- Kasthuri++ (synthetic archive in the real layout) -------------------------------


def kasthuri_archive(path: Path, root: str = "kasthuri_pp_data/") -> tuple[Path, dict[str, np.ndarray]]:
    """Train slices 0-11 (numeric and lexicographic order differ), test 0-2; RGB labels."""
    rng = np.random.default_rng(3)
    expected = {}
    with zipfile.ZipFile(path, "w") as zf:
        for folder, count in (("Train", 12), ("Test", 3)):
            for i in range(count):
                image = rng.integers(0, 256, (40, 56), dtype=np.uint8)
                label = np.zeros((40, 56, 3), dtype=np.uint8)
                label[5 : 10 + i, 5:20] = 255  # mitochondria, a different size per slice
                label[30:, 40:] = 2  # an unlabelled corner
                classes = np.zeros((40, 56), dtype=np.uint8)
                classes[5 : 10 + i, 5:20] = 1
                classes[30:, 40:] = IGNORE_LABEL
                expected[f"{folder}/{i}"] = (image, classes)
                zf.writestr(f"{root}{folder}_In/{i}.png", png_bytes(image))
                zf.writestr(f"{root}{folder}_Out/{i}.png", png_bytes(label))
    return path, expected


def test_kasthuri_maps_unlabelled_areas_to_ignore(tmp_path):
    archive, expected = kasthuri_archive(tmp_path / "kasthuri_pp.zip")
    report, out_h5, _ = prepare(tmp_path, "kasthuri", spec_for("kasthuri_pp"), archive)
    for split, folder in (("train", "Train"), ("test", "Test")):
        prepared = read_split(out_h5, split)
        assert prepared.names == [str(i) for i in range(len(prepared))]
        for index, name in enumerate(prepared.names):
            image, classes = expected[f"{folder}/{name}"]
            np.testing.assert_array_equal(prepared.raw[index], image)
            np.testing.assert_array_equal(prepared.labels[index], classes)
    first = report["splits"]["train"]["slices"][0]
    assert first["foreground_fraction"] == pytest.approx(5 * 15 / (40 * 56 - 10 * 16))  # of labelled pixels
    assert first["labelled_fraction"] == pytest.approx(1 - 10 * 16 / (40 * 56))
    assert report["splits"]["train"]["label_counts"]["255"] == 12 * 10 * 16
    assert read_attrs(out_h5)["archive_root"] == "kasthuri_pp_data/"


def test_kasthuri_colour_label_is_not_binary(tmp_path):
    archive, _ = kasthuri_archive(tmp_path / "kasthuri_pp.zip")
    label = np.zeros((40, 56, 3), dtype=np.uint8)
    label[:20, :, 0] = 255  # red: not part of the documented encoding
    broken = rewrite_zip(
        archive, tmp_path / "broken.zip", replace={"kasthuri_pp_data/Test_Out/1.png": png_bytes(label)}
    )
    assert_fails_cleanly(
        tmp_path, "kasthuri", spec_for("kasthuri_pp"), broken, "not binary", "kasthuri_pp_data/Test_Out/1.png"
    )


# --- bad inputs: each stops the run with a clear message and leaves nothing ----------


def test_truncated_zip(lucchi_zip, tmp_path):
    truncated = tmp_path / "lucchi.zip"
    truncated.write_bytes(lucchi_zip.read_bytes()[: lucchi_zip.stat().st_size // 2])
    assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp"),
        truncated,
        "dataset 'lucchi' (converter lucchi_pp)",
        "not a readable zip file",
        str(truncated),
        "download it again",
    )


def test_corrupt_member_fails_its_crc(mini_lucchi, tmp_path):
    archive = mini_lucchi()
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("Lucchi++/Train_Out/1.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100] ^= 0xFF  # one flipped byte inside the stored member
    archive.write_bytes(bytes(data))
    assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp"),
        archive,
        "cannot be read",
        "Bad CRC-32",
        "Lucchi++/Train_Out/1.png",
        "download it again",
    )


def test_missing_label_file(mini_lucchi, tmp_path):
    archive = mini_lucchi(drop=("Lucchi++/Train_Out/1.png",))
    assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp"),
        archive,
        "1 image(s) without a label",
        "Lucchi++/Train_In/mask0001.png",
        "3 images, 2 labels",
    )


def test_label_without_image(mini_lucchi, lucchi_zip, tmp_path):
    with zipfile.ZipFile(lucchi_zip) as zf:
        extra = zf.read("Lucchi++/Test_Out/7.png")
    archive = mini_lucchi(replace={"Lucchi++/Test_Out/7.png": extra})
    assert_fails_cleanly(
        tmp_path, "lucchi", spec_for("lucchi_pp"), archive, "1 label(s) without an image", "Lucchi++/Test_Out/7.png"
    )


def test_unexpected_file_in_a_label_folder(mini_lucchi, tmp_path):
    archive = mini_lucchi(replace={"Lucchi++/Train_Out/1 (copy).png": b"x"})
    assert_fails_cleanly(
        tmp_path, "lucchi", spec_for("lucchi_pp"), archive, "unexpected file", "Lucchi++/Train_Out/1 (copy).png"
    )


def test_label_of_the_wrong_shape(mini_lucchi, tmp_path):
    label = np.zeros((100, 120), dtype=np.uint8)
    label[10:20, 10:20] = 255
    archive = mini_lucchi(replace={"Lucchi++/Train_Out/1.png": png_bytes(label)})
    assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp"),
        archive,
        "label shape (100, 120) differs from image shape (768, 1024)",
        "Lucchi++/Train_In/mask0001.png",
        "Lucchi++/Train_Out/1.png",
    )


def test_slices_of_different_shapes_within_a_split(mini_lucchi, lucchi_zip, tmp_path):
    with zipfile.ZipFile(lucchi_zip) as zf:
        image = read_png(zf, "Lucchi++/Test_In/mask0002.png")[:500]
        label = read_png(zf, "Lucchi++/Test_Out/2.png")[:500]
    archive = mini_lucchi(
        replace={"Lucchi++/Test_In/mask0002.png": png_bytes(image), "Lucchi++/Test_Out/2.png": png_bytes(label)}
    )
    assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp"),
        archive,
        "slices differ in shape (most are (768, 1024))",
        "Lucchi++/Test_In/mask0002.png (500, 1024)",
    )


def test_non_binary_label(mini_lucchi, lucchi_zip, tmp_path):
    with zipfile.ZipFile(lucchi_zip) as zf:
        label = read_png(zf, "Lucchi++/Train_Out/2.png")
    soft = (label // 2).astype(np.uint8)  # 0 and 127: a soft label, not the {0, 255} encoding
    archive = mini_lucchi(replace={"Lucchi++/Train_Out/2.png": png_bytes(soft)})
    assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp"),
        archive,
        "not binary",
        "values [0, 255]",
        "have other values: 127",
        "Lucchi++/Train_Out/2.png",
        "datasets.lucchi.options.max_stray_fraction",
    )


def test_foreground_fraction_outside_the_configured_bounds(mini_lucchi, tmp_path):
    message = assert_fails_cleanly(
        tmp_path,
        "lucchi",
        spec_for("lucchi_pp", bounds=(0.2, 0.9)),
        mini_lucchi(),
        "outside the plausible range [0.2, 0.9]",
        "Lucchi++/Train_In/mask0000.png",
        "datasets.lucchi.foreground_fraction",
    )
    assert re.search(r"mask0000\.png\|Lucchi\+\+/Train_Out/0\.png \(foreground 0\.\d{4}\)", message)


@pytest.mark.parametrize("converter", ["lucchi_pp", "vnc", "kasthuri_pp"])
def test_missing_archive(converter, tmp_path):
    assert_fails_cleanly(tmp_path, "mine", spec_for(converter), None, "no archive", "datasets.mine.url")
    assert_fails_cleanly(tmp_path, "mine", spec_for(converter), tmp_path / "gone.zip", "does not exist")


def test_unknown_option_is_named(tmp_path):
    archive, _ = kasthuri_archive(tmp_path / "kasthuri_pp.zip")
    assert_fails_cleanly(
        tmp_path,
        "kasthuri",
        spec_for("kasthuri_pp", n_tset=3),
        archive,
        "unknown key(s) ['n_tset']",
        "datasets.kasthuri.options",
        "max_stray_fraction",
        error=ConfigError,
    )


def test_wrong_archive_for_the_converter(mini_lucchi, tmp_path):
    assert_fails_cleanly(
        tmp_path, "vnc", spec_for("vnc"), mini_lucchi(), "no folder 'stack1/raw/'", "this dataset's download"
    )
