"""Converters for the real EM mitochondria datasets: Lucchi++, Drosophila VNC, Kasthuri++.

Each reads its public zip archive directly (no extraction), at native resolution, and pairs
every image with its label by the slice number in the file names, never by list order:
the original study paired Lucchi++ by sorted name and mismatched almost every slice. Names
and source files are kept with every slice so that a reader can check the pairing.

Options (``datasets.<name>.options``), checked here because the schema leaves them free:

- all three: ``max_stray_fraction`` — share of label pixels allowed outside the documented
  encoding (defaults: Lucchi++ 0, VNC 0.001, Kasthuri++ 0.001). Stray pixels are binarised
  at >= 128; more of them than allowed stops the run (the file is then not a mask).
- ``vnc``: ``split`` (default ``shuffle``, published: the test slices are the first
  ``n_test`` (default 3) of ``numpy.random.default_rng(split_seed).permutation(sorted
  names)``, ``split_seed`` default 0); ``contiguous``: ``n_test`` consecutive sections (the
  last ones, or from index ``test_start``) with ``gap`` sections on each side dropped from
  training; ``kfold``: block ``fold`` of ``n_folds`` contiguous blocks, same ``gap``.
- ``kasthuri_pp``: ``voxel_size_nm`` (default [3, 3, 30], the acquisition's; not checked
  against the archive, which no local copy exists of).
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import numpy as np
import tifffile
from PIL import Image

from em_foundation.config import ConfigError
from em_foundation.data.integrity import (
    IntegrityError,
    check_image,
    check_label_values,
    check_same_shape,
    content_digest,
    open_zip,
    pair_by_key,
    read_member,
    stack_slices,
)
from em_foundation.data.prepared import IGNORE_LABEL, Split
from em_foundation.data.registry import CONVERTERS, converter_options, declare_options, declare_stack_test
from em_foundation.data.splits import held_out_block

# Files that archivers add and that are no part of a dataset.
_METADATA = re.compile(r"(^|/)(__MACOSX/|\._|\.DS_Store$|Thumbs\.db$)")

ImageReader = Callable[[zipfile.ZipFile, str, str], np.ndarray]
LabelReader = Callable[[zipfile.ZipFile, str, str], np.ndarray]


# --- archive layout -------------------------------------------------------------------


def _members(archive: zipfile.ZipFile) -> list[str]:
    return [n for n in archive.namelist() if not n.endswith("/") and not _METADATA.search(n)]


def find_root(members: Sequence[str], marker: str, dataset: str, archive_name: str) -> str:
    """The folder that holds ``marker`` (e.g. ``Train_In/``): tolerant of the top folder's name.

    GitHub names the VNC folder after the branch or the commit, and nobody guarantees the
    Casser archives' top folder, so the root is found by what it contains.
    """
    wanted = marker.strip("/").split("/")
    roots = set()
    for member in members:
        parts = member.split("/")[:-1]
        for i in range(len(parts) - len(wanted) + 1):
            if parts[i : i + len(wanted)] == wanted:
                roots.add("".join(f"{p}/" for p in parts[:i]))
    roots = sorted(roots)
    if len(roots) != 1:
        tops = sorted({m.split("/", 1)[0] for m in members})[:10]
        problem = (
            f"no folder {marker!r} in the archive (top-level entries: {tops})"
            if not roots
            else f"several folders {marker!r} in the archive: {roots}"
        )
        raise IntegrityError(dataset, problem, "check that the archive is this dataset's download", [archive_name])
    return roots[0]


def numbered_files(members: Sequence[str], folder: str, pattern: str, dataset: str) -> dict[int, str]:
    """Files directly in ``folder`` by the slice number that ``pattern`` (one group) extracts.

    A file that does not match, or two files with one number, stop the run: either would
    make the pairing ambiguous.
    """
    found: dict[int, str] = {}
    for member in members:
        if not member.startswith(folder) or "/" in member[len(folder) :]:
            continue
        match = re.fullmatch(pattern, member[len(folder) :])
        if match is None:
            raise IntegrityError(
                dataset,
                f"unexpected file in {folder} (expected names like {pattern})",
                "remove it or restore the archive as downloaded",
                [member],
            )
        number = int(match.group(1))
        if number in found:
            raise IntegrityError(
                dataset, f"two files for slice {number}", "remove the duplicate", [found[number], member]
            )
        found[number] = member
    return found


# --- decoding -------------------------------------------------------------------------


def _open_image(archive: zipfile.ZipFile, member: str, dataset: str) -> Image.Image:
    data = read_member(archive, member, dataset)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise IntegrityError(
            dataset, f"cannot decode the image ({err})", "download the archive again", [member]
        ) from None
    return image


def read_png_image(archive: zipfile.ZipFile, member: str, dataset: str) -> np.ndarray:
    image = _open_image(archive, member, dataset)
    if image.mode in ("RGB", "RGBA"):  # gray stored as colour: keep one channel if they agree
        rgb = np.asarray(image)[..., :3]
        if (rgb == rgb[..., :1]).all():
            image = Image.fromarray(rgb[..., 0])
    array = np.asarray(image)
    check_image(array, dataset, member)
    return array


def read_tiff_image(archive: zipfile.ZipFile, member: str, dataset: str) -> np.ndarray:
    data = read_member(archive, member, dataset)
    try:
        array = tifffile.imread(io.BytesIO(data))
    except Exception as err:  # tifffile raises a variety of types for a broken file
        raise IntegrityError(
            dataset, f"cannot decode the TIFF ({err})", "download the archive again", [member]
        ) from None
    check_image(array, dataset, member)
    return array


def label_classes(
    image: Image.Image,
    dataset: str,
    member: str,
    max_stray_fraction: float,
    ignore_value: Optional[int] = None,
) -> np.ndarray:
    """Map a label image to 0 (background), 1 (mitochondria), 255 (ignore).

    The rule: 1-bit images are foreground where > 0. Otherwise the label is read as gray
    (the first channel of an RGB/RGBA label whose channels agree): 255 is foreground, 0
    background, ``ignore_value`` (if any) unlabelled; any other value or colour is a
    stray pixel, tolerated up to ``max_stray_fraction`` and binarised at >= 128.
    """
    if image.mode == "1":
        return np.asarray(image, dtype=bool).astype(np.uint8)
    if image.mode == "P":
        image = image.convert("RGBA")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise IntegrityError(
            dataset,
            f"label is {array.dtype} with shape {array.shape} (mode {image.mode}), expected an 8-bit or 1-bit mask",
            "replace it with the original mask",
            [member],
        )
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
        gray = colour[..., 0]
        is_gray = (colour == gray[..., None]).all(axis=-1)
    else:
        gray, is_gray = array, np.ones(array.shape, dtype=bool)
    named = [0, 255] + ([ignore_value] if ignore_value is not None else [])
    named_table = np.zeros(256, dtype=bool)
    named_table[named] = True
    documented = is_gray & named_table[gray]
    rule = f"values {named}" + (f" ({ignore_value} = unlabelled)" if ignore_value is not None else "")
    check_label_values(gray, documented, dataset, member, rule, max_stray_fraction)
    classes = (gray >= 128).astype(np.uint8)
    if ignore_value is not None:
        classes[is_gray & (gray == ignore_value)] = IGNORE_LABEL
    return classes


def _label_reader(max_stray_fraction: float, ignore_value: Optional[int] = None) -> LabelReader:
    def read(archive: zipfile.ZipFile, member: str, dataset: str) -> np.ndarray:
        image = _open_image(archive, member, dataset)
        return label_classes(image, dataset, member, max_stray_fraction, ignore_value)

    return read


# --- building splits ------------------------------------------------------------------


def read_pairs(
    archive: zipfile.ZipFile,
    pairs: Sequence[tuple[str, str, str]],
    read_image: ImageReader,
    read_label: LabelReader,
    dataset: str,
    split: str,
) -> Split:
    """Decode (name, image member, label member) triples into one checked Split."""
    raws, labels = [], []
    for _, image_member, label_member in pairs:
        raw = read_image(archive, image_member, dataset)
        label = read_label(archive, label_member, dataset)
        check_same_shape(raw, label, dataset, image_member, label_member)
        raws.append(raw)
        labels.append(label)
    members = [p[1] for p in pairs]
    return Split(
        raw=stack_slices(raws, members, dataset, split),
        labels=stack_slices(labels, [p[2] for p in pairs], dataset, split),
        names=[p[0] for p in pairs],
        sources=[f"{image}|{label}" for _, image, label in pairs],
    )


declare_options("lucchi_pp", {"max_stray_fraction": 0.0})
declare_options("kasthuri_pp", {"max_stray_fraction": 0.001, "voxel_size_nm": [3.0, 3.0, 30.0]})
declare_options(
    "vnc",
    {
        "n_test": 3,
        "split_seed": 0,
        "max_stray_fraction": 0.001,
        "split": "shuffle",
        "gap": 0,
        "n_folds": 5,
        "fold": 0,
        "test_start": None,
    },
)

# Lucchi++ and Kasthuri++ test on a whole volume; VNC only where its test block is
# contiguous (one block, or a fold), not the published shuffle of scattered sections.
declare_stack_test("lucchi_pp", lambda options: True)
declare_stack_test("kasthuri_pp", lambda options: True)
declare_stack_test("vnc", lambda options: options["split"] in ("contiguous", "kfold"))


def _casser_layout(
    archive: Optional[Path],
    converter: str,
    image_pattern: str,
    label_pattern: str,
    read_label: LabelReader,
) -> tuple[dict[str, Split], str, str]:
    """Lucchi++ and Kasthuri++ share one layout: <root>/{Train,Test}_{In,Out}/."""
    with open_zip(archive, converter) as zf:
        members = _members(zf)
        root = find_root(members, "Train_In/", converter, zf.filename or str(archive))
        splits = {}
        for split, prefix in (("train", "Train"), ("test", "Test")):
            images = numbered_files(members, f"{root}{prefix}_In/", image_pattern, converter)
            labels = numbered_files(members, f"{root}{prefix}_Out/", label_pattern, converter)
            pairs = pair_by_key(
                images, labels, converter, fix="restore the missing file(s): download the archive again"
            )
            named = [(str(k), image, label) for k, image, label in pairs]
            splits[split] = read_pairs(zf, named, read_png_image, read_label, converter, split)
        return splits, root, _digest_of(zf, splits, root)


def _digest_of(archive: zipfile.ZipFile, splits: Mapping[str, Split], root: str) -> str:
    members = [m for split in splits.values() for source in split.sources for m in source.split("|")]
    return content_digest(archive, members, root)


# --- the converters -------------------------------------------------------------------


@CONVERTERS.register("lucchi_pp")
def convert_lucchi_pp(archive: Optional[Path], spec: Mapping[str, Any]) -> tuple[dict[str, Split], dict[str, Any]]:
    """Lucchi++: ``Train_In/mask0012.png`` pairs with ``Train_Out/12.png`` (and Test_*).

    Train labels are 8-bit {0, 255}, test labels RGBA (0,0,0,255)/(255,255,255,255); both
    are read as gray and must be exactly {0, 255} by default (the data are clean, so any
    other value means a wrong file).
    """
    options = converter_options(spec, "lucchi_pp")
    splits, root, digest = _casser_layout(
        archive, "lucchi_pp", r"mask(\d+)\.png", r"(\d+)\.png", _label_reader(options["max_stray_fraction"])
    )
    return splits, {
        "voxel_size_nm": [5.0, 5.0, 5.0],
        "licence": "none stated in the archive; EPFL CVLab's dataset page and casser.io ask for "
        "citation; check their terms before redistributing",
        "citation": "Casser V, Kang K, Pfister H, Haehn D. Fast Mitochondria Detection for Connectomics. "
        "MIDL 2020, PMLR 121:111-120; Lucchi A, Smith K, Achanta R, Knott G, Fua P. "
        "Supervoxel-Based Segmentation of Mitochondria in EM Image Stacks With Learned "
        "Shape Features. IEEE TMI 31(2):474-486, 2012",
        "source_url": "http://www.casser.io/files/lucchi_pp.zip",
        "archive_root": root,
        "content_digest": digest,
        "label_rule": "gray (first channel of RGBA test labels) 255 -> 1, 0 -> 0; other values stop the run "
        f"beyond max_stray_fraction={options['max_stray_fraction']}",
        "pairing": "Train_In/maskNNNN.png with Train_Out/N.png by the integer N (same for Test)",
    }


@CONVERTERS.register("kasthuri_pp")
def convert_kasthuri_pp(archive: Optional[Path], spec: Mapping[str, Any]) -> tuple[dict[str, Split], dict[str, Any]]:
    """Kasthuri++: Lucchi++'s layout with matching image and label names.

    Labels are RGB: (255,255,255) mitochondria, (0,0,0) background, (2,2,2) an unlabelled
    area, stored as IGNORE_LABEL so that training and metrics skip it.
    """
    options = converter_options(spec, "kasthuri_pp")
    splits, root, digest = _casser_layout(
        archive,
        "kasthuri_pp",
        r"\D*(\d+)\.png",
        r"\D*(\d+)\.png",
        _label_reader(options["max_stray_fraction"], ignore_value=2),
    )
    return splits, {
        "voxel_size_nm": [float(v) for v in options["voxel_size_nm"]],
        "licence": "none stated in the archive; images from Kasthuri et al. 2015, labels by Casser et al.; "
        "cite both and check their terms before redistributing",
        "citation": "Casser V, Kang K, Pfister H, Haehn D. Fast Mitochondria Detection for Connectomics. "
        "MIDL 2020, PMLR 121:111-120; Kasthuri N et al. Saturated Reconstruction of a Volume "
        "of Neocortex. Cell 162(3):648-661, 2015",
        "source_url": "http://www.casser.io/files/kasthuri_pp.zip",
        "archive_root": root,
        "content_digest": digest,
        "label_rule": "gray 255 -> 1, 0 -> 0, (2,2,2) -> 255 (ignore); other values stop the run beyond "
        f"max_stray_fraction={options['max_stray_fraction']} (binarised at >= 128)",
        "pairing": "Train_In/X.png with Train_Out/X.png by the integer in the name (same for Test)",
    }


def vnc_split(
    names: Sequence[str],
    n_test: int,
    seed: int,
    split: str = "shuffle",
    gap: int = 0,
    n_folds: int = 5,
    fold: int = 0,
    test_start: int | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Train, test and dropped slice names (see data.splits.held_out_block).

    shuffle (published): the first ``n_test`` of a seeded permutation of the sections in
    stack order; contiguous: ``n_test`` consecutive sections (the last ones, or from index
    ``test_start``); kfold: block ``fold`` of ``n_folds``. ``gap`` sections beside a
    contiguous test block are left out of training.
    """
    if split != "kfold" and not 0 < n_test < len(names):
        raise ConfigError(f"datasets.<name>.options.n_test must be between 1 and {len(names) - 1}, got {n_test}")
    try:
        return held_out_block(names, n_test, split, seed, gap, n_folds, fold, test_start)
    except ValueError as error:
        raise ConfigError(f"datasets.<name>.options (vnc): {error}") from None


@CONVERTERS.register("vnc")
def convert_vnc(archive: Optional[Path], spec: Mapping[str, Any]) -> tuple[dict[str, Split], dict[str, Any]]:
    """Drosophila VNC stack1: ``raw/NN.tif`` with ``mitochondria/NN.png``, split by a recorded seed.

    The masks mix 1-bit images (foreground > 0) and 8-bit ones with a few stray in-between
    values (foreground >= 128). There is no official test split, so one is drawn once from
    ``split_seed`` and recorded in the attributes and the integrity report.
    """
    options = converter_options(spec, "vnc")
    dataset = "vnc"
    with open_zip(archive, dataset) as zf:
        members = _members(zf)
        root = find_root(members, "stack1/raw/", dataset, zf.filename or str(archive))
        images = numbered_files(members, f"{root}stack1/raw/", r"(\d+)\.tiff?", dataset)
        labels = numbered_files(members, f"{root}stack1/mitochondria/", r"(\d+)\.png", dataset)
        pairs = pair_by_key(images, labels, dataset, fix="restore the missing file(s): download the archive again")
        named = {PurePosixPath(image).stem: (PurePosixPath(image).stem, image, label) for _, image, label in pairs}
        train, test, dropped = vnc_split(
            list(named),
            int(options["n_test"]),
            int(options["split_seed"]),
            str(options["split"]),
            int(options["gap"]),
            int(options["n_folds"]),
            int(options["fold"]),
            options["test_start"],
        )
        read_label = _label_reader(float(options["max_stray_fraction"]))
        splits = {
            split: read_pairs(zf, [named[n] for n in names], read_tiff_image, read_label, dataset, split)
            for split, names in (("train", train), ("test", test))
        }
        digest = _digest_of(zf, splits, root)
    rules = {
        "shuffle": "test = first n_test of numpy.random.default_rng(split_seed).permutation(sorted slice names)",
        "contiguous": "test = n_test consecutive sections (the last, or from test_start); gap sections beside it dropped",
        "kfold": "test = block fold of n_folds contiguous blocks (numpy.array_split); gap sections beside it dropped",
    }
    split_info = {
        "rule": rules[str(options["split"])],
        "split": str(options["split"]),
        "split_seed": int(options["split_seed"]),
        "n_test": len(test),
        "gap": int(options["gap"]),
        **({"n_folds": int(options["n_folds"]), "fold": int(options["fold"])} if options["split"] == "kfold" else {}),
        "train": train,
        "test": test,
        "dropped": dropped,
    }
    return splits, {
        "voxel_size_nm": [4.6, 4.6, 45.0],
        "licence": "CC BY-NC-SA 3.0",
        "citation": "Gerhard S, Funke J, Martel J, Cardona A, Fetter R. Segmented anisotropic ssTEM dataset "
        "of neural tissue. figshare 2013, doi:10.6084/m9.figshare.856713",
        "source_url": "https://github.com/unidesigner/groundtruth-drosophila-vnc",
        "archive_root": root,
        "content_digest": digest,
        "label_rule": "1-bit masks: > 0 -> 1; 8-bit masks: >= 128 -> 1 (stray values between 0 and 255 "
        f"tolerated up to max_stray_fraction={options['max_stray_fraction']} per slice)",
        "pairing": "stack1/raw/NN.tif with stack1/mitochondria/NN.png by NN",
        "split": split_info,
        "split_seed": int(options["split_seed"]),
    }
