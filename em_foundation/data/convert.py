"""Prepare one dataset: convert its source, check it, write the HDF5 and its integrity report.

Both outputs appear together or not at all: every check runs before anything is written,
and each file is written under a temporary name and renamed only when both are complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from em_foundation.config import ConfigError
from em_foundation.data.integrity import IntegrityError, build_report, check_splits
from em_foundation.data.prepared import write_prepared
from em_foundation.data.registry import get_converter
from em_foundation.io import atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)


def prepare_dataset(
    name: str,
    spec: dict[str, Any],
    archive: Optional[Path],
    out_h5: Path,
    out_report: Path,
) -> dict[str, Any]:
    """Convert, check and write. Nothing is written unless every check passes.

    Errors are re-raised under the dataset's config name, since converters only know
    their own name and the user needs to know which config entry to fix.
    """
    started = time.perf_counter()
    bounds = spec.get("foreground_fraction", [0.0, 1.0])
    archive = Path(archive) if archive is not None else None
    try:
        splits, attrs = get_converter(spec["converter"])(archive, spec)
        check_splits(spec["converter"], splits, bounds)
    except IntegrityError as err:
        raise err.for_dataset(name) from None
    except ConfigError as err:
        raise ConfigError(str(err).replace("datasets.<name>.", f"datasets.{name}.")) from None
    # Every dataset records its in-plane pixel size (y, x) in nm: generic converters from
    # options.pixel_size_nm, the others from their voxel size.
    if "pixel_size_nm" not in attrs and "voxel_size_nm" in attrs:
        attrs = {**attrs, "pixel_size_nm": [float(v) for v in list(attrs["voxel_size_nm"])[:2]]}
    archive_sha256 = file_sha256(archive) if archive is not None else None
    report = build_report(name, spec, splits, attrs, archive, archive_sha256)
    report["conversion_seconds"] = round(time.perf_counter() - started, 3)
    attrs = {
        "dataset": name,
        "converter": spec["converter"],
        **attrs,
        "url": spec.get("url") or "",
        "sha256": archive_sha256 or "",
    }
    with atomic_path(out_report) as report_tmp:
        write_json(report_tmp, report)
        write_prepared(out_h5, splits, attrs)
    log.info(
        "prepared %s: %s in %.1f s",
        name,
        ", ".join(f"{s} {len(v)} slices" for s, v in splits.items()),
        report["conversion_seconds"],
    )
    return report
