"""The workflow end to end on the real VNC archive and Lucchi++ subset (../shared/data).

Downloads go through the real download rule from file:// URLs (with the local copies'
checksums), conversion through the real converters, and every test metric is computed on
the full native masks: 768×1024 for Lucchi++, 1024×1024 for VNC.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from tests.conftest import SHARED_DATA
from tests.workflow import REPO, scheduled_jobs, snakemake, write_config

LOCAL_COPIES = {
    "lucchi": ("lucchi_pp_subset.zip", "3bd95bb2f1195af7c2bd0e264689579f2c5ec286b41b72b1b69256156a61ddcd"),
    "vnc": (
        "groundtruth-drosophila-vnc-master.zip",
        "6763f2a91af1fc21f334dbe0ed88fe50bed5aec546426f2f8a3762667a9ad309",
    ),
}


def real_data_config() -> dict:
    """The published config pointed at the local copies, with the filter-bank backbone only."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, (file, sha256) in LOCAL_COPIES.items():
        config["datasets"][name]["url"] = (SHARED_DATA / file).as_uri()
        config["datasets"][name]["sha256"] = sha256
    config["backbones"] = {"filterbank": {"family": "filterbank", "options": {"patch_size": 8}}}
    config["regimes"] = ["head"]
    config["seeds"] = [0]
    config["head"] = {"width": 16}
    config["training"].update({"lr": 1e-3, "batch_size": 4, "max_epochs": 4, "patience": 2})
    config["analysis"] = {**config.get("analysis", {}), "n_boot": 10, "n_perm": 10}
    config["compute"] = {"device": "cpu", "threads": 1}
    return config


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    missing = [file for file, _ in LOCAL_COPIES.values() if not (SHARED_DATA / file).is_file()]
    if missing:
        reason = f"real EM archives {missing} are absent from {SHARED_DATA} (only the project's machines have them)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("real")
    configfile = write_config(workdir / "config.yaml", real_data_config())
    snakemake(workdir, configfile=configfile, timeout=3000)
    return workdir


def test_real_data_runs_end_to_end_at_native_resolution(real_run):
    assert (real_run / "resources/downloads/lucchi.zip").is_file()
    per_image = pd.read_csv(real_run / "results/tables/per_image.csv")
    shapes = per_image.groupby("test_set")[["height", "width"]].agg(["min", "max"])
    assert shapes.loc["lucchi"].tolist() == [768, 768, 1024, 1024]
    assert shapes.loc["vnc"].tolist() == [1024, 1024, 1024, 1024]
    assert per_image.groupby("test_set").size().to_dict() == {"lucchi": 20 * 3, "vnc": 3 * 3}
    runs = pd.read_csv(real_run / "results/tables/runs.csv")
    assert set(runs["test_set"]) == {"lucchi", "vnc", "lucchi+vnc"}
    assert (runs["n_pixels"][runs.test_set == "lucchi"] == 20 * 768 * 1024).all()
    print(runs[["train_set", "test_set", "fg_iou", "fg_dice", "mean_iou"]].to_string(index=False))


def test_real_data_run_is_complete(real_run):
    configfile = real_run / "config.yaml"
    assert not scheduled_jobs(snakemake(real_run, "-n", configfile=configfile))
