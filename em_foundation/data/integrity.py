"""Integrity checks on source archives and converted slices, and the per-dataset report.

Every check raises IntegrityError *before* anything is written, so a corrupt download, a
missing label or a mis-encoded mask stops the run with a message that names the dataset,
the file, the offending value and the fix, instead of becoming a prepared HDF5 that every
later stage trusts. The report written beside the HDF5 records what was checked and the
numbers a reader needs to trust the data (counts, shapes, per-slice foreground fractions,
the split, the archive's sha256).
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from em_foundation.data.prepared import IGNORE_LABEL, Split

VALID_LABELS = (0, 1, IGNORE_LABEL)
_MAX_LISTED = 8


class IntegrityError(ValueError):
    """The data are not what the converter documents; the message says what to fix."""

    def __init__(self, dataset: str, problem: str, fix: str, files: Sequence[str] = ()) -> None:
        self.dataset, self.problem, self.fix, self.files = dataset, problem, fix, list(files)
        super().__init__(self._message())

    def _message(self) -> str:
        listed = ", ".join(self.files[:_MAX_LISTED])
        if len(self.files) > _MAX_LISTED:
            listed += f", … ({len(self.files)} in all)"
        where = f" [file(s): {listed}]" if self.files else ""
        return f"dataset {self.dataset}: {self.problem}{where}. Fix: {self.fix}"

    def for_dataset(self, name: str) -> "IntegrityError":
        """The same error under the dataset's config name (converters only know their own)."""
        label = repr(name) if name == self.dataset else f"{name!r} (converter {self.dataset})"
        fix = self.fix.replace("datasets.<name>.", f"datasets.{name}.")
        return IntegrityError(label, self.problem, fix, self.files)


# --- archives -------------------------------------------------------------------------


def open_zip(archive: Optional[Path], dataset: str) -> zipfile.ZipFile:
    """Open the archive, turning a missing or truncated download into a clear error."""
    if archive is None:
        raise IntegrityError(
            dataset,
            "no archive was given to the converter",
            "set datasets.<name>.url (and .sha256) so the download rule fetches it",
        )
    archive = Path(archive)
    if not archive.is_file():
        raise IntegrityError(dataset, "the archive does not exist", "run the download rule again", [str(archive)])
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise IntegrityError(
            dataset,
            f"the archive is not a readable zip file ({err}); it is probably truncated or corrupt",
            "delete it and download it again; check datasets.<name>.sha256 against the source",
            [str(archive)],
        ) from None


def read_member(archive: zipfile.ZipFile, member: str, dataset: str) -> bytes:
    """Read one member; a CRC or decompression failure names the archive and the member."""
    try:
        return archive.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise IntegrityError(
            dataset,
            f"the archive member cannot be read ({err}); the archive is corrupt",
            "delete the archive and download it again",
            [f"{archive.filename}:{member}"],
        ) from None


def content_digest(archive: zipfile.ZipFile, members: Iterable[str], root: str) -> str:
    """sha256 over (path below the root, CRC-32, size) of the members that were converted.

    It identifies the data themselves: re-zipping, another compression level or another top
    folder name (GitHub's branch vs commit archives) change the archive's sha256 but not
    this. An identifier, not a security check (CRC-32 is not collision-resistant).
    """
    digest = hashlib.sha256()
    for member in sorted(members):
        info = archive.getinfo(member)
        digest.update(f"{member[len(root) :]}\t{info.CRC:08x}\t{info.file_size}\n".encode())
    return digest.hexdigest()


# --- pairing and shapes ---------------------------------------------------------------


def pair_by_key(
    images: Mapping[int, str], labels: Mapping[int, str], dataset: str, fix: str
) -> list[tuple[int, str, str]]:
    """Pair image and label files by their slice number; an orphan on either side stops the run.

    Pairing by number, never by list order, is the guard against the sorted-name bug that
    mismatched almost every Lucchi++ slice in the original study.
    """
    unlabelled = [images[k] for k in sorted(set(images) - set(labels))]
    imageless = [labels[k] for k in sorted(set(labels) - set(images))]
    if unlabelled or imageless:
        parts = []
        if unlabelled:
            parts.append(f"{len(unlabelled)} image(s) without a label")
        if imageless:
            parts.append(f"{len(imageless)} label(s) without an image")
        raise IntegrityError(
            dataset,
            f"{' and '.join(parts)} ({len(images)} images, {len(labels)} labels)",
            fix,
            unlabelled + imageless,
        )
    if not images:
        raise IntegrityError(dataset, "no image-label pairs found", fix)
    return [(key, images[key], labels[key]) for key in sorted(images)]


def check_image(image: np.ndarray, dataset: str, member: str) -> None:
    if image.ndim != 2 or image.dtype != np.uint8:
        raise IntegrityError(
            dataset,
            f"image is {image.dtype} with shape {image.shape}, expected 8-bit grayscale (H, W)",
            "replace it with the original 8-bit grayscale slice",
            [member],
        )


def check_same_shape(image: np.ndarray, label: np.ndarray, dataset: str, image_member: str, label_member: str) -> None:
    if image.shape != label.shape:
        raise IntegrityError(
            dataset,
            f"label shape {label.shape} differs from image shape {image.shape}",
            "replace the label with the original mask of that slice",
            [image_member, label_member],
        )


def odd_shapes(
    shapes: Sequence[tuple[int, ...]], names: Sequence[str]
) -> tuple[tuple[int, ...], list[tuple[str, tuple]]]:
    """The most common shape, and (name, shape) of each array that differs from it."""
    common = max(set(shapes), key=list(shapes).count)
    return common, [(name, shape) for name, shape in zip(names, shapes) if shape != common]


def stack_slices(arrays: Sequence[np.ndarray], members: Sequence[str], dataset: str, split: str) -> np.ndarray:
    """Stack a split's slices; slices of different shapes name the odd ones out."""
    common, differ = odd_shapes([a.shape for a in arrays], members)
    odd = [f"{m} {s}" for m, s in differ]
    if odd:
        raise IntegrityError(
            dataset,
            f"split {split!r}: slices differ in shape (most are {common})",
            "replace the odd slice(s) with the originals",
            odd,
        )
    return np.stack(arrays)


# --- label values ---------------------------------------------------------------------


def check_label_values(
    values: np.ndarray, documented: np.ndarray, dataset: str, member: str, rule: str, max_stray_fraction: float
) -> None:
    """Stop if more pixels than allowed break the documented label encoding.

    ``documented`` marks pixels whose value the converter's rule names exactly (0 and 255,
    say); the rest are "stray". A few stray pixels are real (VNC's masks have some); many
    mean the file is not a mask of this encoding (an image in the label folder, a
    soft or colour label), which thresholding would silently turn into nonsense.
    """
    stray = ~documented
    n_stray = int(stray.sum())
    if n_stray / documented.size > max_stray_fraction:
        found = np.unique(values[stray])
        shown = ", ".join(str(v) for v in found[:10]) + (" …" if len(found) > 10 else "")
        raise IntegrityError(
            dataset,
            f"label is not binary under the documented rule ({rule}): {n_stray} pixel(s) "
            f"({n_stray / documented.size:.4%}, allowed {max_stray_fraction:.4%}) have other values: {shown}",
            "replace it with the original mask, or raise datasets.<name>.options.max_stray_fraction "
            "if these values are known to be harmless",
            [member],
        )


# --- whole splits ---------------------------------------------------------------------


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Pixel count per label value present; counts the valid values directly (no full sort)."""
    counts = {v: int(np.count_nonzero(labels == v)) for v in VALID_LABELS}
    if sum(counts.values()) != labels.size:
        others, other_counts = np.unique(labels[~np.isin(labels, VALID_LABELS)], return_counts=True)
        counts.update({int(v): int(c) for v, c in zip(others, other_counts)})
    return {v: c for v, c in sorted(counts.items()) if c}


def foreground_fractions(split: Split) -> tuple[list[float], list[float]]:
    """Per slice: foreground share of the labelled pixels, and the labelled share of the slice."""
    fg, labelled = [], []
    for labels in split.labels:
        known = labels != IGNORE_LABEL
        n_known = int(known.sum())
        fg.append(float((labels == 1).sum() / n_known) if n_known else 0.0)
        labelled.append(n_known / labels.size)
    return fg, labelled


def check_splits(dataset: str, splits: Mapping[str, Split], bounds: Sequence[float]) -> None:
    """Checks every converter's output must pass, whatever the source."""
    if not splits:
        raise IntegrityError(dataset, "the converter returned no splits", "check the archive's layout")
    lo, hi = bounds
    for split_name, split in splits.items():
        if len(split) == 0:
            raise IntegrityError(dataset, f"split {split_name!r} is empty", "check the archive's layout")
        if len(set(split.names)) != len(split.names):
            duplicates = sorted({n for n in split.names if split.names.count(n) > 1})
            raise IntegrityError(
                dataset, f"split {split_name!r} has duplicate slice names", "remove the duplicate files", duplicates
            )
        counts = label_counts(split.labels)
        bad_values = sorted(set(counts) - set(VALID_LABELS))
        if bad_values or split.labels.dtype != np.uint8:
            raise IntegrityError(
                dataset,
                f"split {split_name!r}: labels are {split.labels.dtype} with values {bad_values} "
                f"outside {list(VALID_LABELS)}",
                "fix the converter's binarisation",
            )
        fractions, _ = foreground_fractions(split)
        outside = [
            f"{source} (foreground {fraction:.4f})"
            for source, fraction in zip(split.sources, fractions)
            if not lo <= fraction <= hi
        ]
        if outside:
            raise IntegrityError(
                dataset,
                f"split {split_name!r}: {len(outside)} slice(s) have a foreground fraction outside "
                f"the plausible range [{lo}, {hi}]",
                "check that these masks belong to their images; if the range is too tight, widen "
                "datasets.<name>.foreground_fraction",
                outside,
            )


def build_report(
    dataset: str,
    spec: Mapping[str, Any],
    splits: Mapping[str, Split],
    attrs: Mapping[str, Any],
    archive: Optional[Path],
    archive_sha256: Optional[str],
) -> dict[str, Any]:
    """The integrity report written as JSON beside the prepared HDF5."""
    expected = spec.get("sha256")
    report: dict[str, Any] = {
        "dataset": dataset,
        "converter": spec["converter"],
        "status": "passed",
        "checks": [
            "archive opens and every member read passes its CRC",
            "every image has exactly one label and vice versa (paired by slice number)",
            "image and label shapes agree; all slices of a split share one shape",
            "labels follow the documented encoding (see label_rule)",
            "per-slice foreground fraction within foreground_fraction_bounds",
        ],
        "archive": {
            "file": str(archive) if archive is not None else None,
            "sha256": archive_sha256,
            "expected_sha256": expected,
            "sha256_matches_config": (archive_sha256 == expected) if expected and archive_sha256 else None,
            "size_bytes": Path(archive).stat().st_size if archive is not None else None,
        },
        "content_digest": attrs.get("content_digest"),
        "url": spec.get("url"),
        "label_rule": attrs.get("label_rule"),
        "pixel_size_nm": attrs.get("pixel_size_nm"),
        "intensity_stretch": attrs.get("intensity_stretch", {"applied": False}),
        "foreground_fraction_bounds": list(spec.get("foreground_fraction", [0.0, 1.0])),
        "split_info": attrs.get("split"),
        "splits": {},
    }
    for split_name, split in splits.items():
        fractions, labelled = foreground_fractions(split)
        counts = label_counts(split.labels)
        n_known = sum(c for v, c in counts.items() if v != IGNORE_LABEL)
        report["splits"][split_name] = {
            "n_slices": len(split),
            "shape": list(split.raw.shape[1:]),
            "raw_dtype": str(split.raw.dtype),
            "label_dtype": str(split.labels.dtype),
            "label_counts": {str(v): c for v, c in counts.items()},
            "foreground_fraction_mean": float(np.mean(fractions)),
            "foreground_fraction_min": float(np.min(fractions)),
            "foreground_fraction_max": float(np.max(fractions)),
            "foreground_fraction_pooled": counts.get(1, 0) / max(n_known, 1),
            "slices": [
                {"name": n, "source": s, "foreground_fraction": f, "labelled_fraction": lf}
                for n, s, f, lf in zip(split.names, split.sources, fractions, labelled)
            ],
        }
    return report
