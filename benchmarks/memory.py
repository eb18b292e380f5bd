"""Memory stays flat as the data grows: peak RSS of head training and of evaluation at 1×, 10× and
50× the demo's tiles, and the time streaming costs over reading a split whole.

    python -m benchmarks.memory [--scales 1 10 50] [--out benchmarks/results-memory.csv]

The data is the demo's (profiles/demo/workflow_config.yaml: synthetic FIB-SEM slices, the
demo's tiling, the filter-bank backbone's feature cache, the demo's head and training
settings) with ``scale`` times as many training and test slices, built through the
package's own stages (prepare, tile, cache). Each measurement runs in its own Python
process, so its peak RSS (VmHWM at the end) is that measurement's alone: ``train_run``
(head, 2 epochs) and ``evaluate_model`` with ``compute.data_in_memory: never``
(streaming) at every scale, and ``always`` (the split read whole) at the largest scale
for comparison. The time ratio trains the 1× data in both modes, epochs interleaved, and
compares the median seconds per epoch of fit's own history.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: keep the output readable

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import REPO, Table, median, spread  # noqa: E402

DEMO = REPO / "profiles" / "demo" / "workflow_config.yaml"
TARGET_RSS = 1.20  # peak RSS at 10× and 50× within 20 % of 1×
TARGET_TIME = 1.10  # streaming at most 10 % slower than in-memory at 1×


def demo_settings() -> dict[str, Any]:
    """The demo's dataset, tiling, head and training blocks."""
    config = yaml.safe_load(DEMO.read_text())
    dataset = config["datasets"]["fibsem"]
    return {
        "dataset": dataset,
        "view": f"tile{config['tiling']['tile_size']}o{config['tiling']['overlap']}",
        "backbone": config["backbones"]["filterbank"],
        "feature_batch": config["features"]["batch_size"],
        "head": config["head"],
        "training": {k: v for k, v in config["training"].items() if not k.startswith("n_train_slices")},
    }


def make_data(root: Path, scale: int, base_train: int, base_test: int, size: int) -> dict[str, str]:
    """The demo dataset with ``scale`` × its slices: prepared file, tiles, split, filter-bank cache."""
    import torch

    from em_foundation.backbones import build_backbone
    from em_foundation.data.convert import prepare_dataset
    from em_foundation.data.prepared import read_split
    from em_foundation.data.splits import validation_split
    from em_foundation.data.tiles import tile_dataset
    from em_foundation.feature_cache import cache_features
    from em_foundation.grid import parse_view
    from em_foundation.io import write_json

    demo = demo_settings()
    root.mkdir(parents=True, exist_ok=True)
    spec = {**demo["dataset"], "url": None, "sha256": None}
    spec["options"] = {
        **spec["options"],
        "n_train": base_train * scale,
        "n_test": base_test * scale,
        "height": size,
        "width": size,
    }
    paths = {
        "prepared": str(root / "bench.h5"),
        "tiles": str(root / "bench.tiles.h5"),
        "features": str(root / "bench.features.h5"),
        "split": str(root / "bench.split.json"),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_dataset("bench", spec, None, Path(paths["prepared"]), root / "bench.integrity.json")
        tile_dataset(paths["prepared"], paths["tiles"], view=parse_view(demo["view"]))
        names = read_split(paths["prepared"], "train").names
        write_json(paths["split"], validation_split(names, demo["training"]["val_fraction"], 0))
        backbone = build_backbone(demo["backbone"])
        cache_features(
            backbone, paths["tiles"], paths["features"], demo["feature_batch"], torch.device("cpu"), {"backbone": "fb"}
        )
    return paths


def _status(key: str) -> float:
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def measure(kind: str, data: Path, mode: str, epochs: int) -> dict[str, Any]:
    """One measurement, run in this (fresh) process: train or evaluate; its peak RSS and seconds."""
    import torch

    from em_foundation.evaluation.evaluate import evaluate_model
    from em_foundation.training.run import load_segmenter, train_run

    torch.set_num_threads(1)
    paths = json.loads((data / "paths.json").read_text())
    demo = demo_settings()
    start_mib = _status("VmRSS")
    started = time.perf_counter()
    out = data / f"{kind}-{mode}"
    out.mkdir(exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()) as log:
        if kind == "train":
            record = train_run(
                regime="head",
                backbone_name="filterbank",
                train_set="bench",
                datasets=["bench"],
                seed=0,
                backbone={},
                head=demo["head"],
                lora={},
                training={**demo["training"], "max_epochs": epochs, "patience": epochs + 1},
                tiles={"bench": paths["tiles"]},
                features={"bench": paths["features"]},
                splits={"bench": paths["split"]},
                device=torch.device("cpu"),
                out_model=out / "model.pt",
                out_log=out / "train_log.csv",
                out_run=out / "run.json",
                data_in_memory=mode,
            )
            tiles, loading = record["data"]["bench"]["train_tiles"], record["data_loading"]
            epoch_seconds = pd.read_csv(out / "train_log.csv")["seconds"].tolist()
        else:
            model = load_segmenter(data / "train-never" / "model.pt", {})
            per_image, _ = evaluate_model(
                model, "head", paths["prepared"], paths["tiles"], paths["features"], torch.device("cpu"),
                data_in_memory=mode,
            )  # fmt: skip
            tiles, epoch_seconds = int(len(per_image)), []
            loading = {"mode": "streaming" if mode == "never" else "in-memory"}
    return {
        "peak_mib": _status("VmHWM"),
        "start_mib": start_mib,
        "seconds": time.perf_counter() - started,
        "epoch_seconds": epoch_seconds,
        "units": tiles,
        "loading": loading,
        "log": log.getvalue()[-2000:],
    }


def _child(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", *args], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise RuntimeError(f"measurement {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_ratio(data: Path, repeats: int, epochs: int) -> dict[str, list[float]]:
    """Median fit seconds per epoch, in-memory and streaming, runs interleaved (one process each)."""
    seconds: dict[str, list[float]] = {"always": [], "never": []}
    for repeat in range(repeats):
        for mode in ("always", "never") if repeat % 2 == 0 else ("never", "always"):
            result = _child(["train", str(data), mode, str(epochs)])
            seconds[mode] += result["epoch_seconds"][1:]  # the first epoch warms up
    return seconds


def run_memory_benchmark(
    scales: list[int],
    root: Path,
    base_train: int | None = None,
    base_test: int | None = None,
    size: int | None = None,
    epochs: int = 2,
    time_repeats: int = 3,
    time_epochs: int = 4,
) -> pd.DataFrame:
    demo = demo_settings()["dataset"]["options"]
    base_train, base_test = base_train or demo["n_train"], base_test or demo["n_test"]
    size = size or demo["height"]
    table = Table()
    peaks: dict[tuple[str, str, int], dict[str, Any]] = {}
    for scale in scales:
        data = root / f"x{scale}"
        t0 = time.perf_counter()
        paths = make_data(data, scale, base_train, base_test, size)
        (data / "paths.json").write_text(json.dumps(paths))
        print(f"{scale}x: data built in {time.perf_counter() - t0:.1f} s", flush=True)
        modes = ["never", "always"] if scale == max(scales) else ["never"]
        for mode in modes:
            for kind in ("train", "evaluate"):
                if kind == "evaluate" and not (data / "train-never" / "model.pt").exists():
                    continue
                peaks[kind, mode, scale] = result = _child([kind, str(data), mode, str(epochs)])
                what = "head training (train_run, 2 epochs)" if kind == "train" else "evaluation (evaluate_model)"
                units = "training tiles" if kind == "train" else "test slices"
                label = "streaming" if mode == "never" else "in-memory"
                table.add(
                    "memory",
                    "filterbank",
                    f"peak RSS, {what}, {label}, {scale}x ({result['units']} {units})",
                    result["peak_mib"],
                    "MiB",
                    1,
                    f"own process, VmHWM at its end; RSS after imports {result['start_mib']:.0f} MiB; "
                    f"{result['seconds']:.1f} s; {result['loading'].get('mode')}",
                )
    base = min(scales)
    for kind in ("train", "evaluate"):
        for scale in scales:
            if scale == base or (kind, "never", scale) not in peaks:
                continue
            ratio = peaks[kind, "never", scale]["peak_mib"] / peaks[kind, "never", base]["peak_mib"]
            table.add(
                "memory",
                "filterbank",
                f"ratio peak RSS {scale}x / {base}x, {'head training' if kind == 'train' else 'evaluation'}, streaming",
                ratio,
                "x",
                1,
                f"target <= {TARGET_RSS:.2f}: {'met' if ratio <= TARGET_RSS else 'missed'}",
            )
    seconds = time_ratio(root / f"x{base}", time_repeats, time_epochs)
    ratio = median(seconds["never"]) / median(seconds["always"])
    for mode, label in (("always", "in-memory"), ("never", "streaming")):
        table.add(
            "memory",
            "filterbank",
            f"head training seconds per epoch, {label}, {base}x",
            median(seconds[mode]),
            "s/epoch",
            len(seconds[mode]),
            f"fit history, {time_repeats} runs of {time_epochs} epochs, first epoch of each dropped; {spread(seconds[mode])}",
        )
    table.add(
        "memory",
        "filterbank",
        f"ratio streaming / in-memory seconds per epoch, {base}x, cpu",
        ratio,
        "x",
        min(len(v) for v in seconds.values()),
        f"target <= {TARGET_TIME:.2f}: {'met' if ratio <= TARGET_TIME else 'missed'}; load1 {os.getloadavg()[0]:.2f}",
    )
    return table.frame()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        kind, data, mode, epochs = argv[1:5]
        print(json.dumps(measure(kind, Path(data), mode, int(epochs))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-memory.csv")
    parser.add_argument("--base-train", type=int, help="training slices at 1x (default: the demo's)")
    parser.add_argument("--base-test", type=int, help="test slices at 1x (default: the demo's)")
    parser.add_argument("--size", type=int, help="slice height and width (default: the demo's)")
    parser.add_argument("--time-repeats", type=int, default=3)
    parser.add_argument("--time-epochs", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="em-memory-"))
    try:
        frame = run_memory_benchmark(
            args.scales,
            root,
            args.base_train,
            args.base_test,
            args.size,
            time_repeats=args.time_repeats,
            time_epochs=args.time_epochs,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
