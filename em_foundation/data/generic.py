"""Converters for the user's own labelled EM data: ``volume`` (image and label stacks) and ``folder``.

Sources. With ``url: null`` the paths in the options are local files, relative to the
working directory (Snakemake's ``-d``/``--directory``); with a zip archive (``url`` +
``sha256``) they are paths inside the archive, which is unpacked to a temporary folder
that is removed afterwards.

``volume`` reads a multi-page TIFF (``x.tif``), an HDF5 dataset (``x.h5:group/dataset``) or
a Zarr array (``x.zarr`` or ``x.zarr:group/array``). ``folder`` reads two folders of 2-D
PNG/TIFF files, paired by the number in the file name (the last run of digits of the stem,
as for Lucchi++) or by identical stems (``pair_by: stem``), never by list order.

Options (exactly these keys)::

    train: {images: ..., labels: ...}   test: {images: ..., labels: ...}
    images: ..., labels: ..., test_slices: "120:165"      # volume only, instead of train/test
    pair_by: number | stem                               # folder only (default number)
    foreground: ">0" (default; instance labels work) or a list of label values, e.g. [1] or [255]
    ignore_value: a label value that is neither class (stored as 255: loss and metrics skip it)
    pixel_size_nm: [y, x] or one number (required)

Images that are not 8-bit (16-bit, 32-bit, float) are mapped to 8 bits by a per-dataset
percentile stretch: the ``STRETCH_PERCENTILES`` (0.5, 99.5) of all training images, pooled,
go to 0 and 255 (clipped beyond), and the same map is applied to the test images, so no
test statistic shapes its own input. The map is recorded in the attrs and the integrity
report (``intensity_stretch``). 8-bit images are kept as they are.

Labels: 1-bit masks are foreground where set. Other labels are integers: ``foreground``
``">0"`` makes every positive value foreground (instance labels), a list makes those values
foreground, 0 background and any other value (but ``ignore_value``) an error naming the file,
the slice and the values. A split without any foreground pixel stops the run.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import h5py
import numpy as np
import tifffile
from PIL import Image

from em_foundation.config import ConfigError
from em_foundation.data.integrity import IntegrityError, check_same_shape, odd_shapes, open_zip, stack_slices
from em_foundation.data.prepared import IGNORE_LABEL, Split
from em_foundation.data.registry import CONVERTERS, converter_options, declare_options
from em_foundation.io import file_sha256

STRETCH_PERCENTILES = (0.5, 99.5)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
_IGNORED_FILES = re.compile(r"^(\..*|Thumbs\.db|desktop\.ini)$")
_CONTAINER = re.compile(r"(?P<file>.+?\.(?:h5|hdf5|hdf|zarr))(?::(?P<inner>.+))?")

_COMMON = {"train": None, "test": None, "foreground": None, "ignore_value": None, "pixel_size_nm": None}
declare_options("volume", {**_COMMON, "images": None, "labels": None, "test_slices": None}, required=("pixel_size_nm",))
declare_options("folder", {**_COMMON, "pair_by": "number"}, required=("pixel_size_nm",))


# --- options --------------------------------------------------------------------------


def pixel_size_option(value: Any) -> list[float]:
    """``pixel_size_nm`` as [y, x] in nm: one number means square pixels."""
    values = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    ok = isinstance(values, (list, tuple)) and len(values) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        raise ConfigError(
            f"datasets.<name>.options.pixel_size_nm is {value!r}; give the pixel size in nm as [y, x] "
            "(e.g. [5.0, 5.0]) or one positive number"
        )
    return [float(v) for v in values]


def foreground_option(value: Any) -> Optional[list[int]]:
    """None for ``">0"`` (every positive value), else the list of foreground label values."""
    if value is None or value == ">0":
        return None
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return sorted(set(value))
    raise ConfigError(
        f'datasets.<name>.options.foreground is {value!r}; use ">0" (every positive label value, e.g. '
        "instance labels) or a list of positive label values, e.g. [1] or [255]"
    )


def ignore_option(value: Any, foreground: Optional[list[int]]) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value in (foreground or []):
        raise ConfigError(
            f"datasets.<name>.options.ignore_value is {value!r}; give one integer label value that is neither "
            "background (0) nor a foreground value, or null"
        )
    return value


def _pair_option(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or set(value) != {"images", "labels"}:
        raise ConfigError(
            f"datasets.<name>.options.{key} is {value!r}; give {{images: <path>, labels: <path>}} (both keys, no others)"
        )
    return {k: str(value[k]) for k in ("images", "labels")}


def parse_slices(text: Any, n_slices: int) -> range:
    """``"120:165"``: slices 120 to 164 (Python's half-open range), inside the volume."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text)) if text is not None else None
    if match is None or not int(match.group(1)) < int(match.group(2)) <= n_slices:
        raise ConfigError(
            f'datasets.<name>.options.test_slices is {text!r}; give "start:stop" with 0 <= start < stop <= '
            f'{n_slices} (the volume\'s number of slices), e.g. "{max(0, n_slices - n_slices // 5)}:{n_slices}"'
        )
    return range(int(match.group(1)), int(match.group(2)))


# --- where the files are --------------------------------------------------------------


@contextmanager
def source_root(archive: Optional[Path], dataset: str) -> Iterator[Path]:
    """The folder the option paths are relative to: the working directory, or the unpacked archive."""
    if archive is None:
        yield Path.cwd()
        return
    with open_zip(archive, dataset) as zf, tempfile.TemporaryDirectory(prefix="em_foundation_") as tmp:
        try:
            zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as err:
            raise IntegrityError(
                dataset, f"the archive cannot be unpacked ({err})", "download it again", [str(archive)]
            ) from None
        yield Path(tmp)


def _resolve(root: Path, ref: str, dataset: str, key: str, archive: Optional[Path]) -> Path:
    path = root / ref
    if not path.exists():
        where = (
            f"inside the archive {archive}"
            if archive is not None
            else f"relative to the working directory {Path.cwd()}"
        )
        raise IntegrityError(
            dataset,
            f"options.{key}: {ref!r} does not exist ({where})",
            "fix the path (local paths are relative to the directory snakemake runs in)",
            [ref],
        )
    return path


# --- readers --------------------------------------------------------------------------


def read_volume(root: Path, ref: str, dataset: str, key: str, archive: Optional[Path] = None) -> np.ndarray:
    """A (N, H, W) stack from a multi-page TIFF, ``x.h5:group/dataset`` or ``x.zarr[:array]``."""
    container = _CONTAINER.fullmatch(ref)
    path = _resolve(root, container.group("file") if container else ref, dataset, key, archive)
    inner = container.group("inner") if container else None
    try:
        if container and path.suffix == ".zarr":
            import zarr

            node = zarr.open(str(path), mode="r")
            if inner:
                node = node[inner]
            if not hasattr(node, "shape"):
                arrays = sorted(name for name, _ in node.arrays())
                raise IntegrityError(
                    dataset,
                    f"options.{key}: {ref!r} is a Zarr group, not an array (arrays: {arrays})",
                    f"name the array: {ref}:<array>",
                    [ref],
                )
            array = np.asarray(node[...])
        elif container:
            with h5py.File(path, "r") as handle:
                if not inner or inner not in handle or not isinstance(handle[inner], h5py.Dataset):
                    found: list[str] = []
                    handle.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
                    raise IntegrityError(
                        dataset,
                        f"options.{key}: no dataset {inner!r} in {path.name} (datasets: {found[:10]})",
                        f"write it as {container.group('file')}:<group/dataset>",
                        [ref],
                    )
                array = handle[inner][()]
        else:
            with tifffile.TiffFile(path) as tif:
                if tif.series[0].axes.endswith("S"):  # (..., Y, X, samples): a colour image, not a stack
                    raise IntegrityError(
                        dataset,
                        f"options.{key}: {ref!r} is a colour image (axes {tif.series[0].axes})",
                        "export a grayscale (slices, height, width) stack",
                        [ref],
                    )
                array = tif.asarray()
    except IntegrityError:
        raise
    except Exception as err:  # the readers raise many types for a broken file
        raise IntegrityError(
            dataset, f"options.{key}: cannot read {ref!r} ({type(err).__name__}: {err})", "check the file", [ref]
        ) from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise IntegrityError(
            dataset,
            f"options.{key}: {ref!r} has shape {array.shape}; expected a grayscale stack (slices, height, width)",
            "export one channel as a (slices, height, width) stack",
            [ref],
        )
    return array


def read_plane(path: Path, dataset: str) -> np.ndarray:
    """One 2-D image or mask: PNG through Pillow (1-bit masks stay boolean), TIFF through tifffile."""
    try:
        if path.suffix.lower() == ".png":
            image = Image.open(path)
            image.load()
            if image.mode in ("RGB", "RGBA"):
                rgb = np.asarray(image)[..., :3]
                array = rgb[..., 0] if (rgb == rgb[..., :1]).all() else rgb
            else:
                array = np.asarray(image)
        else:
            array = tifffile.imread(path)
    except Exception as err:  # Pillow and tifffile raise many types for a broken file
        raise IntegrityError(
            dataset, f"cannot decode the image ({type(err).__name__}: {err})", "replace the file", [str(path)]
        ) from None
    if array.ndim == 3 and array.shape[0] == 1:  # a one-page TIFF saved as a (1, H, W) stack
        array = array[0]
    if array.ndim != 2:
        raise IntegrityError(
            dataset,
            f"image has shape {array.shape}; expected one grayscale 2-D image",
            "save single grayscale slices (use converter 'volume' for stacks)",
            [str(path)],
        )
    return array


def unlabelled_files(source: str | Path) -> list[tuple[str, Path]]:
    """(name, file) of every image ``predict.images`` names: a folder's images by stem, or the stack file.

    Torch-free, so that the predict rule lists them as its inputs (a new, removed or changed
    image reruns predict) with the same names the script writes. Two images with one stem
    would write the same ``<stem>_*`` files: refused, naming both.
    """
    path = Path(source)
    if path.is_dir() and path.suffix != ".zarr":
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"predict.images: no {', '.join(IMAGE_SUFFIXES)} files in {path}")
        seen: dict[str, Path] = {}
        for file in files:
            if file.stem in seen:
                raise ValueError(
                    f"predict.images: {seen[file.stem]} and {file} have one name {file.stem!r} and would "
                    f"write the same {file.stem}_* files; rename one of them"
                )
            seen[file.stem] = file
        return list(seen.items())
    container = _CONTAINER.fullmatch(str(source))
    return [(str(source), Path(container.group("file") if container else source))]


# --- intensities and labels -----------------------------------------------------------


def stretch_to_uint8(train: Sequence[np.ndarray], others: Sequence[np.ndarray], dataset: str, files: Sequence[str]):
    """All images as uint8, and the record of the map used (None-free, for the report).

    8-bit images pass unchanged. Otherwise every image must share one dtype, and the pooled
    ``STRETCH_PERCENTILES`` of the training images map linearly to 0-255.
    """
    images = [*train, *others]
    dtypes = sorted({str(a.dtype) for a in images})
    if len(dtypes) > 1:
        examples = [f"{f} ({a.dtype})" for f, a in zip(files, images)]
        shown = [next(e for e in examples if e.endswith(f"({d})")) for d in dtypes]
        raise IntegrityError(
            dataset,
            f"images have different dtypes {dtypes}; one intensity map cannot serve them all",
            "convert every image of the dataset to one bit depth",
            shown,
        )
    if dtypes == ["uint8"]:
        return list(train), list(others), {"applied": False, "source_dtype": "uint8"}
    if images[0].dtype == bool or not np.issubdtype(images[0].dtype, np.number):
        raise IntegrityError(
            dataset, f"images are {dtypes[0]}, not grayscale intensities", "export grayscale images", [files[0]]
        )
    pooled = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in train])
    pooled = pooled[np.isfinite(pooled)]
    lo, hi = (float(v) for v in np.percentile(pooled, STRETCH_PERCENTILES)) if pooled.size else (0.0, 0.0)
    if not hi > lo:
        raise IntegrityError(
            dataset, f"training images are constant ({lo}); nothing to stretch", "check the image files", [files[0]]
        )

    def to_uint8(array: np.ndarray) -> np.ndarray:
        scaled = (np.nan_to_num(np.asarray(array, dtype=np.float64), nan=lo) - lo) / (hi - lo) * 255.0
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)

    record = {
        "applied": True,
        "source_dtype": dtypes[0],
        "percentiles": list(STRETCH_PERCENTILES),
        "bounds": [lo, hi],
        "fitted_on": "train images, pooled",
        "rule": "uint8 = clip(round((x - bounds[0]) / (bounds[1] - bounds[0]) * 255), 0, 255)",
    }
    return [to_uint8(a) for a in train], [to_uint8(a) for a in others], record


def label_rule(foreground: Optional[list[int]], ignore: Optional[int]) -> str:
    fg = "every value > 0" if foreground is None else f"values {foreground}"
    extra = f"; {ignore} -> 255 (ignored)" if ignore is not None else ""
    return f"1-bit masks: set -> 1; integer labels: {fg} -> 1, 0 -> 0{extra}"


def classify(
    label: np.ndarray, foreground: Optional[list[int]], ignore: Optional[int], dataset: str, where: str
) -> np.ndarray:
    """One 2-D label to 0/1/255; a value outside the declared ones names the file and slice."""
    if label.dtype == bool:
        return label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        if not np.issubdtype(label.dtype, np.floating) or not np.all(np.mod(label, 1) == 0):
            raise IntegrityError(
                dataset,
                f"label is {label.dtype} with non-integer values",
                "export the labels as an integer (or 1-bit) mask",
                [where],
            )
        label = label.astype(np.int64)
    declared = [0, *(foreground or []), *([ignore] if ignore is not None else [])]
    outside = label < 0 if foreground is None else ~np.isin(label, declared)
    if ignore is not None and foreground is None:
        outside &= label != ignore
    if outside.any():
        values = np.unique(label[outside])
        shown = ", ".join(str(v) for v in values[:10]) + (" …" if len(values) > 10 else "")
        allowed = "0, any positive value" if foreground is None else ", ".join(str(v) for v in declared)
        raise IntegrityError(
            dataset,
            f"label has values outside the declared ones ({allowed}): {shown} in {int(outside.sum())} pixel(s)",
            "set datasets.<name>.options.foreground (and ignore_value) to the values your labels use",
            [where],
        )
    classes = (label > 0 if foreground is None else np.isin(label, foreground)).astype(np.uint8)
    if ignore is not None:
        classes[label == ignore] = IGNORE_LABEL
    return classes


def check_has_foreground(
    split: Split, split_name: str, dataset: str, foreground: Optional[list[int]], label_files: Sequence[str]
) -> None:
    if not (split.labels == 1).any():
        raise IntegrityError(
            dataset,
            f"split {split_name!r} has no foreground pixel under foreground={foreground or '>0'}",
            "check options.foreground against the label values, and that the label files are masks",
            sorted(set(label_files))[:5],
        )


def check_one_size(images: Sequence[np.ndarray], files: Sequence[str], dataset: str, split_name: str) -> None:
    """One split of your own data holds images of one size (README, 'Your own data').

    Not padded to a common size: padding would enter the intensity statistics, the feature
    cache and the domain analysis as black pixels. Each size can be a dataset of its own,
    joined with the others in a training set (training pads across datasets, with labels the
    loss ignores).
    """
    common, differ = odd_shapes([image.shape for image in images], files)
    odd = [f"{file} {shape[0]}×{shape[1]}" for file, shape in differ]
    if odd:
        raise IntegrityError(
            dataset,
            f"split {split_name!r}: the images of one split must have one size; most are {common[0]}×{common[1]}, "
            f"{len(odd)} differ",
            "crop them to one size, or put each size in a dataset of its own and join those in a training set "
            "(training_sets: {mine: [small, large]})",
            odd,
        )


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _digest(files: Sequence[Path], root: Path) -> str:
    """sha256 over (path below the root, file sha256) of every file read: identifies the data."""
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        inner_files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # Zarr: a folder
        for inner in inner_files:
            digest.update(f"{_relative(inner, root)}\t{file_sha256(inner)}\n".encode())
    return digest.hexdigest()


def _finish(
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str], list[tuple[str, str]]]],
    options: Mapping[str, Any],
    dataset: str,
) -> tuple[dict[str, Split], dict[str, Any]]:
    """Stretch the images, classify the labels, stack and check each split.

    Each slice's source is an (image, label) pair, kept as a pair until the prepared file
    stores it as ``image|label``: a file name may hold a ``|`` itself.
    """
    foreground = foreground_option(options["foreground"])
    ignore = ignore_option(options["ignore_value"], foreground)
    train_raw, test_raw, stretch = stretch_to_uint8(
        parts["train"][0], parts["test"][0], dataset, [image for p in parts.values() for image, _ in p[3]]
    )
    raws = {"train": train_raw, "test": test_raw}
    splits = {}
    for split_name, (_, labels, names, sources) in parts.items():
        classes = [
            classify(label, foreground, ignore, dataset, f"{label_file} (slice {name})")
            for label, name, (_, label_file) in zip(labels, names, sources)
        ]
        for raw, cls, (image_file, label_file) in zip(raws[split_name], classes, sources):
            check_same_shape(raw, cls, dataset, image_file, label_file)
        check_one_size(raws[split_name], [image for image, _ in sources], dataset, split_name)
        split = Split(
            raw=stack_slices(raws[split_name], [image for image, _ in sources], dataset, split_name),
            labels=stack_slices(classes, [label for _, label in sources], dataset, split_name),
            names=names,
            sources=[f"{image}|{label}" for image, label in sources],
        )
        check_has_foreground(split, split_name, dataset, foreground, [label for _, label in sources])
        splits[split_name] = split
    return splits, {
        "label_rule": label_rule(foreground, ignore),
        "intensity_stretch": stretch,
        "pixel_size_nm": pixel_size_option(options["pixel_size_nm"]),
        "foreground": ">0" if foreground is None else foreground,
        "ignore_value": ignore,
    }


# --- volume ---------------------------------------------------------------------------


@CONVERTERS.register("volume")
def convert_volume(archive: Optional[Path], spec: Mapping[str, Any]) -> tuple[dict[str, Split], dict[str, Any]]:
    """Image and label stacks of the same shape; test part as its own pair of files or a slice range."""
    options = converter_options(spec, "volume")
    dataset = "volume"
    pixel_size_option(options["pixel_size_nm"])
    foreground_option(options["foreground"])
    pairs_given = options["train"] is not None or options["test"] is not None
    single_given = any(options[k] is not None for k in ("images", "labels", "test_slices"))
    if pairs_given == single_given or (single_given and any(options[k] is None for k in ("images", "labels"))):
        raise ConfigError(
            "datasets.<name>.options: give either train: {images, labels} and test: {images, labels}, "
            'or images, labels and test_slices (e.g. "120:165"), not both'
        )
    with source_root(archive, dataset) as root:
        parts = {}
        files: list[Path] = []
        if pairs_given:
            for split_name in ("train", "test"):
                pair = _pair_option(options[split_name], split_name)
                images = read_volume(root, pair["images"], dataset, f"{split_name}.images", archive)
                labels = read_volume(root, pair["labels"], dataset, f"{split_name}.labels", archive)
                _check_volume_shapes(images, labels, pair["images"], pair["labels"], dataset)
                names = [str(z) for z in range(len(images))]
                sources = [(f"{pair['images']}[{z}]", f"{pair['labels']}[{z}]") for z in range(len(images))]
                parts[split_name] = (list(images), list(labels), names, sources)
                files += [_container_path(root, pair["images"]), _container_path(root, pair["labels"])]
            split_info = {"rule": "train and test from separate files"}
        else:
            images = read_volume(root, str(options["images"]), dataset, "images", archive)
            labels = read_volume(root, str(options["labels"]), dataset, "labels", archive)
            _check_volume_shapes(images, labels, str(options["images"]), str(options["labels"]), dataset)
            test = parse_slices(options["test_slices"], len(images))
            train = [z for z in range(len(images)) if z not in test]
            if not train:
                raise ConfigError(
                    "datasets.<name>.options.test_slices covers the whole volume; leave slices to train on"
                )
            for split_name, indices in (("train", train), ("test", list(test))):
                names = [str(z) for z in indices]
                sources = [(f"{options['images']}[{z}]", f"{options['labels']}[{z}]") for z in indices]
                parts[split_name] = ([images[z] for z in indices], [labels[z] for z in indices], names, sources)
            files += [_container_path(root, str(options["images"])), _container_path(root, str(options["labels"]))]
            split_info = {"rule": f"test = slices {test.start}:{test.stop} of one volume", "test_slices": str(test)}
        splits, attrs = _finish(parts, options, dataset)
        attrs["content_digest"] = _digest(files, root)
    attrs["split"] = split_info
    attrs["pairing"] = "image slice z with label slice z of the same shape"
    return splits, attrs


def _container_path(root: Path, ref: str) -> Path:
    container = _CONTAINER.fullmatch(ref)
    return root / (container.group("file") if container else ref)


def _check_volume_shapes(images: np.ndarray, labels: np.ndarray, image_ref: str, label_ref: str, dataset: str) -> None:
    if images.shape != labels.shape:
        raise IntegrityError(
            dataset,
            f"image stack has shape {images.shape} but label stack has shape {labels.shape}",
            "give a label stack with one mask per image slice, of the same height and width",
            [image_ref, label_ref],
        )


# --- folder ---------------------------------------------------------------------------


def folder_files(folder: Path, pair_by: str, dataset: str) -> dict[Any, Path]:
    """Image files of one folder by pairing key; a file without a key, or two with one key, stop the run."""
    found: dict[Any, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() or _IGNORED_FILES.match(path.name):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise IntegrityError(
                dataset,
                f"unexpected file in {folder} (expected {', '.join(IMAGE_SUFFIXES)} images)",
                "move it out of the folder",
                [str(path)],
            )
        if pair_by == "stem":
            key: Any = path.stem
        else:
            numbers = re.findall(r"\d+", path.stem)
            if not numbers:
                raise IntegrityError(
                    dataset,
                    "file name has no number to pair it by",
                    "rename it with its slice number, or set options.pair_by: stem",
                    [str(path)],
                )
            key = int(numbers[-1])
        if key in found:
            raise IntegrityError(
                dataset,
                f"two files with the pairing key {key!r} (pair_by: {pair_by})",
                "remove the duplicate",
                [str(found[key]), str(path)],
            )
        found[key] = path
    return found


def pair_files(images: dict[Any, Path], labels: dict[Any, Path], dataset: str) -> list[tuple[Any, Path, Path]]:
    unlabelled = [str(images[k]) for k in sorted(set(images) - set(labels))]
    imageless = [str(labels[k]) for k in sorted(set(labels) - set(images))]
    if unlabelled or imageless:
        raise IntegrityError(
            dataset,
            f"{len(unlabelled)} image(s) without a label and {len(imageless)} label(s) without an image",
            "add the missing file(s) or remove the unpaired one(s)",
            unlabelled + imageless,
        )
    if not images:
        raise IntegrityError(dataset, "no image-label pairs found", "check options.<split>.images and .labels")
    return [(key, images[key], labels[key]) for key in sorted(images)]


@CONVERTERS.register("folder")
def convert_folder(archive: Optional[Path], spec: Mapping[str, Any]) -> tuple[dict[str, Split], dict[str, Any]]:
    """Two folders of 2-D images per split, paired by the number in the name or by stem."""
    options = converter_options(spec, "folder")
    dataset = "folder"
    pixel_size_option(options["pixel_size_nm"])
    foreground_option(options["foreground"])
    pair_by = str(options["pair_by"])
    if pair_by not in ("number", "stem"):
        raise ConfigError(f"datasets.<name>.options.pair_by is {pair_by!r}; use number or stem")
    pairs = {split: _pair_option(options[split], split) for split in ("train", "test")}
    with source_root(archive, dataset) as root:
        parts = {}
        files: list[Path] = []
        for split_name, pair in pairs.items():
            folders = {k: _resolve(root, pair[k], dataset, f"{split_name}.{k}", archive) for k in ("images", "labels")}
            matched = pair_files(
                folder_files(folders["images"], pair_by, dataset),
                folder_files(folders["labels"], pair_by, dataset),
                dataset,
            )
            parts[split_name] = (
                [read_plane(image, dataset) for _, image, _ in matched],
                [read_plane(label, dataset) for _, _, label in matched],
                [str(key) for key, _, _ in matched],
                [(_relative(image, root), _relative(label, root)) for _, image, label in matched],
            )
            files += [p for _, image, label in matched for p in (image, label)]
        splits, attrs = _finish(parts, options, dataset)
        attrs["content_digest"] = _digest(files, root)
    attrs["split"] = {"rule": "train and test from separate folders"}
    attrs["pairing"] = (
        "image and label by the last number in the file name" if pair_by == "number" else "image and label by stem"
    )
    return splits, attrs
