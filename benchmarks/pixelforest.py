"""Cost of the per-pixel forest (regime pixelforest): training and prediction seconds and peak
memory per 100 slices of 768×1024, on the real code paths.

    python -m benchmarks.pixelforest [--train 8] [--test 4] [--threads 2] [--out benchmarks/results-pixelforest.csv]

Synthetic FIB-SEM slices of 768×1024 go through ``tile_dataset`` in the extended study's view
``tile448o64`` (six overlapping 448 px tiles per slice), then ``train_run(regime="pixelforest")``
(ilastik's 49 features computed once per whole slice, balanced pixel sample, forest fit,
validation calibration) and ``evaluate_model`` (every pixel of every test slice predicted once,
the tiles cropped from it and stitched) with config.yaml's ``pixelforest`` block. Seconds are measured on
a few slices and scaled linearly to 100: features and prediction are per slice; the forest
fit grows slightly faster than linearly with the sample (n log n), so the training figure for
100 slices is a lower bound; the note says how many slices were measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import REPO, PeakMemory, Table, load1, published  # noqa: E402
from em_foundation.data.prepared import Split, write_prepared  # noqa: E402
from em_foundation.data.synthetic import generate_images  # noqa: E402
from em_foundation.data.tiles import tile_dataset  # noqa: E402
from em_foundation.evaluation.evaluate import evaluate_model  # noqa: E402
from em_foundation.grid import parse_view  # noqa: E402
from em_foundation.io import write_json  # noqa: E402
from em_foundation.training.run import load_segmenter, train_run  # noqa: E402

SLICE = (768, 1024)
PER = 100  # slices the figures are scaled to
VIEW = "tile448o64"  # the extended study's tiling, where the per-pixel forest runs


def view_for(shape: tuple[int, int]) -> str:
    """``VIEW``, or for slices smaller than its tile (the tests' tiny run) tiles of half their short side."""
    if min(shape) >= 448:
        return VIEW
    tile = max(8, min(shape) // 2 // 8 * 8)
    return f"tile{tile}o{tile // 4}"


def make_stack(root: Path, n_train: int, n_test: int, shape: tuple[int, int]) -> dict[str, str]:
    """Prepared file, whole-slice tiles and a split (last training slice validates) of synthetic slices."""
    raw, labels = generate_images("fibsem", n_train + n_test, shape[0], shape[1], seed=0)
    names = [f"slice{i:03d}" for i in range(n_train + n_test)]
    prepared = root / "pf.h5"
    write_prepared(
        prepared,
        {
            "train": Split(raw[:n_train], labels[:n_train], names[:n_train]),
            "test": Split(raw[n_train:], labels[n_train:], names[n_train:]),
        },
        {"dataset": "pf"},
    )
    tiles = root / "pf.tiles.h5"
    tile_dataset(prepared, tiles, view=parse_view(view_for(shape)))
    split = root / "pf.split.json"
    write_json(split, {"train": names[: n_train - 1], "val": names[n_train - 1 : n_train]})
    return {"prepared": str(prepared), "tiles": str(tiles), "split": str(split)}


def bench_pixelforest(
    table: Table, root: Path, n_train: int = 8, n_test: int = 4, threads: int = 2, shape: tuple[int, int] = SLICE
) -> None:
    """Rows ``pixelforest``: train and predict seconds per 100 slices, and each stage's peak RSS."""
    if n_train < 2 or n_test < 1:
        raise ValueError("the pixelforest benchmark needs at least 2 training slices (one validates) and 1 test slice")
    torch.set_num_threads(threads)
    paths = make_stack(root, n_train, n_test, shape)
    options = dict(published()["pixelforest"])
    size = f"{shape[0]}x{shape[1]}"
    setting = (
        f"{options['n_estimators']} trees, {options['pixels_per_tile']} px/tile, {len(options['sigmas'])} scales, "
        f"{options['calibration']} calibration, {threads} threads, {view_for(shape)}"
    )
    memory = PeakMemory(torch.device("cpu"))
    load = load1()
    with memory:
        started = time.perf_counter()
        record = train_run(
            regime="pixelforest",
            backbone_name="filterbank",
            train_set="pf",
            datasets=["pf"],
            seed=0,
            backbone={},
            head={},
            lora={},
            training={},
            pixelforest=options,
            tiles={"pf": paths["tiles"]},
            features=None,
            splits={"pf": paths["split"]},
            device=torch.device("cpu"),
            out_model=root / "model.pt",
            out_log=root / "train_log.csv",
            out_run=root / "run.json",
            threads=threads,
        )
        train_s = time.perf_counter() - started
    note = f"{n_train} slices measured ({n_train - 1} train + 1 validation), scaled ×{PER / n_train:.4g}; load1 {load:.2f}-{load1():.2f}"
    table.add(
        "pixelforest", "filterbank", f"train, per {PER} slices {size}, {setting}", train_s * PER / n_train, "s", 1, note
    )
    table.add(
        "memory",
        "filterbank",
        f"peak RSS, pixelforest training ({n_train} slices {size})",
        memory.peak_mib,
        "MiB",
        1,
        memory.note(),
    )
    table.add(
        "pixelforest",
        "filterbank",
        "pixels sampled in training",
        record["pixels_sampled"],
        "pixels",
        1,
        f"{record['features']['channels']} features per pixel",
    )
    memory = PeakMemory(torch.device("cpu"))
    load = load1()
    with memory:
        model = load_segmenter(root / "model.pt", {})
        started = time.perf_counter()
        per_image, predictions = evaluate_model(
            model, "pixelforest", paths["prepared"], paths["tiles"], None, torch.device("cpu")
        )
        predict_s = time.perf_counter() - started
    assert all(p.shape == shape for p in predictions), "prediction at native resolution"
    note = f"{n_test} test slices measured (every pixel predicted, stitched, scored), scaled ×{PER / n_test:.4g}; load1 {load:.2f}-{load1():.2f}"
    table.add(
        "pixelforest",
        "filterbank",
        f"predict, per {PER} slices {size}, {setting}",
        predict_s * PER / n_test,
        "s",
        1,
        note,
    )
    table.add(
        "memory",
        "filterbank",
        f"peak RSS, pixelforest prediction ({n_test} slices {size})",
        memory.peak_mib,
        "MiB",
        1,
        memory.note(),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=8, help="training slices measured (the last validates)")
    parser.add_argument("--test", type=int, default=4, help="test slices measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-pixelforest.csv")
    args = parser.parse_args(argv)
    table = Table()
    with tempfile.TemporaryDirectory(prefix="em-bench-pf-") as root:
        bench_pixelforest(table, Path(root), args.train, args.test, args.threads)
    frame = table.frame()
    print()
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    frame.to_csv(args.out, index=False)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
