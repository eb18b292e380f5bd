"""The workflow end to end on the embedded demo, and what a config change reschedules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.workflow import REPO, demo_config, demo_runs_per_model, scheduled_jobs, snakemake, write_config

# models per backbone × regime: 3 training sets × 2 seeds, plus the in-domain sets' label-efficiency sizes
PER_MODEL = demo_runs_per_model()

STAGES = {
    "prepare_dataset",
    "split_validation",
    "tile_dataset",
    "cache_features",
    "train_head",
    "train_lora",
    "evaluate",
    "aggregate",
}
UPSTREAM = {"prepare_dataset", "split_validation", "tile_dataset", "cache_features"}


def test_dry_run_dag_contains_every_stage(tmp_path):
    jobs = scheduled_jobs(snakemake(tmp_path, "-n"))
    assert STAGES <= set(jobs), f"missing stages: {STAGES - set(jobs)}"
    assert any(rule.startswith("figure_") for rule in jobs)
    assert not (tmp_path / "results").exists(), "a dry-run wrote results"


def test_published_dry_run_lists_the_real_downloads(tmp_path):
    started = time.perf_counter()
    result = snakemake(tmp_path, "-n", "--config", "preset=published", "-p")
    seconds = time.perf_counter() - started
    jobs = scheduled_jobs(result)
    print(f"published grid dry-run: {seconds:.1f} s, {sum(jobs.values())} jobs: {dict(jobs)}")
    assert jobs["download_dataset"] == 2 and jobs["fetch_weights"] == 3
    assert jobs["train_head"] == jobs["train_lora"] == 3 * 3 * 5
    assert jobs["evaluate"] == jobs["train_head"] + jobs["train_lora"], "one evaluation job per trained model"
    # The published input: whole slices resized to 1022 (patch 14) / 1008 (patch 16), no tiles.
    views = set(re.findall(r"results/tiles/([^/\s]+)/", result.stdout + result.stderr))
    assert views == {"resize1022p14", "resize1008p16"}, views
    assert jobs["tile_dataset"] == 2 * 2


def test_label_efficiency_sweep_adds_runs_beside_todays_paths(tmp_path):
    config = demo_config()
    config["training"]["n_train_slices"] = [2, "all"]
    config["training"]["n_train_slices_for"] = ["fibsem"]
    result = snakemake(tmp_path, "-n", "-p", configfile=write_config(tmp_path / "sweep.yaml", config))
    jobs = scheduled_jobs(result)
    # demo: filterbank (head) and tinyvit (head, lora), 3 training sets, 2 seeds; fibsem gets a 2-slice run too
    assert jobs["train_head"] == 2 * 4 * 2 and jobs["train_lora"] == 4 * 2, dict(jobs)
    text = result.stdout + result.stderr
    assert "models/filterbank/head/fibsem/none/seed0-n2/model.pt" in text
    assert "models/filterbank/head/fibsem/none/seed0/model.pt" in text
    assert "/sstem/none/seed0-n2" not in text and "/paired/none/seed0-n2" not in text, "only fibsem gets the sweep"


def test_extended_preset_dry_run_tiles_at_native_resolution(tmp_path):
    result = snakemake(tmp_path, "-n", "--config", "preset=extended")
    jobs = scheduled_jobs(result)
    assert set(re.findall(r"results/tiles/(tile448o64)[/-]", result.stdout + result.stderr)) == {"tile448o64"}
    assert jobs["train_fullft"] and jobs["train_forest"] and jobs["train_head"] > 3 * 3 * 5
    assert re.search(r"prepared/kasthuri\.h5", result.stdout + result.stderr), "Kasthuri++ is the third domain"
    assert "models/sam2Bplus/lora/" in result.stdout + result.stderr, "SAM2 Hiera-B+ beside SAM and micro-sam"
    assert jobs["fetch_weights"] == 7  # DINOv2-L, DINOv3-L, OpenCLIP-L, SAM-B, micro-sam B, SAM2-B+, ResNet-50


def test_bad_config_stops_with_the_key_named(tmp_path):
    config = demo_config()
    config["training"]["paitence"] = 3
    result = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "bad.yaml", config), check=False)
    assert result.returncode != 0
    assert "'paitence'" in result.stdout + result.stderr


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint", check=False)
    output = result.stdout + result.stderr
    assert "Lints for" not in output, output[-3000:]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo, from a directory outside the clone."""
    workdir = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    snakemake(workdir)
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return workdir


def test_demo_runs_end_to_end(demo_run):
    runs = pd.read_csv(demo_run / "results/tables/runs.csv")
    for column in ["backbone", "regime", "train_set", "seed", "test_set", "fg_iou", "fg_dice", "mean_iou", "n_pixels"]:
        assert column in runs.columns
    # 3 backbones: filterbank (head, pixelforest), tinyvit (head, lora, pixelforest) and the U-Net
    # (supervised); 3 training sets; 2 seeds; 2 test sets; plus the paired models scored on the
    # union of their sources.
    union = runs["test_set"].str.contains("+", regex=False)
    assert (~union).sum() == 6 * PER_MODEL * 2
    assert set(runs[union]["train_set"]) == {"paired"} and union.sum() == 6 * 2
    assert set(runs[runs.backbone == "unet"]["regime"]) == {"supervised"} and (runs["augment"] == "none").all()
    assert runs.groupby(["backbone", "regime", "train_set", "n_train_slices", "test_set"]).size().eq(2).all()
    summary = pd.read_csv(demo_run / "results/tables/summary.csv")
    assert {"fg_iou_mean", "fg_iou_std", "fg_iou_n", "n_train_slices", "obj_f1_mean", "obj_f1_std"} <= set(
        summary.columns
    )
    assert (summary["fg_iou_n"] == 2).all()
    # object scores: 2-D everywhere; synthetic test splits are no stack, so no 3-D score
    objects = ["obj_precision", "obj_recall", "obj_f1", "pq", "count_error", "n_true_objects", "n_pred_objects"]
    assert runs[objects].notna().all().all() and (runs["n_true_objects"] > 0).all()
    assert "obj_f1_3d" not in runs.columns or runs["obj_f1_3d"].isna().all()
    swept = sorted(set(runs["n_train_slices"].astype(str)))
    figures = ["iou_bars", "cross_domain", "qualitative", "learning_curves"]
    figures += ["label_efficiency"] if len(swept) > 1 else []
    for name in figures:
        for ext in ["png", "pdf"]:
            assert (demo_run / f"results/figures/{name}.{ext}").stat().st_size > 1000
    assert not (REPO / "results").exists() and not (REPO / "resources").exists(), "the demo wrote into the clone"
    filterbank = runs[(runs.backbone == "filterbank") & (runs.train_set == runs.test_set)]
    assert filterbank["fg_iou"].mean() > 0.3, "the filter-bank head learned nothing on its own domain"


def test_demo_pixelforest_predicts_every_native_pixel_from_tiles_and_tokens(demo_run):
    """The per-pixel forest runs on both backbones: the filter bank from the tiles alone, the ViT
    from its upsampled tokens beside the bank; scored on the same native pixels as the head."""
    runs = pd.read_csv(demo_run / "results/tables/runs.csv")
    pixel = runs[runs.regime == "pixelforest"].set_index(
        ["backbone", "train_set", "n_train_slices", "seed", "test_set"]
    )
    head = runs[runs.regime == "head"].set_index(pixel.index.names)
    assert set(pixel.index.get_level_values("backbone")) == {"filterbank", "tinyvit"}
    assert (pixel["n_pixels"] == head.loc[pixel.index, "n_pixels"]).all()
    in_domain = pixel.reset_index().query("backbone == 'filterbank' and train_set == test_set")
    assert in_domain["fg_iou"].mean() > 0.3, "the per-pixel filter-bank forest learned nothing on its own domain"
    for backbone, tokens in (("filterbank", 0), ("tinyvit", 192)):
        record = json.loads(
            (demo_run / f"results/models/{backbone}/pixelforest/fibsem/none/seed0/run.json").read_text()
        )
        assert record["features"]["token_channels"] == tokens and record["features"]["filterbank"]
        assert record["calibration"] == "validation" and 0 < record["threshold"] < 1


def test_predict_with_the_per_pixel_forest_gives_the_evaluated_masks(demo_run, tmp_path):
    """predict_images on a demo test slice with the ViT's per-pixel forest (pixels and tokens) and the
    filter bank's (pixels only) reproduces the masks evaluation saved for that slice."""
    import tifffile
    import torch

    from em_foundation.backbones import build_backbone
    from em_foundation.config import validate_config
    from em_foundation.data.prepared import pixel_size_of, read_split
    from em_foundation.grid import parse_view, view_of
    from em_foundation.io import open_h5
    from em_foundation.predict import predict_images
    from em_foundation.regimes import reads_tokens
    from em_foundation.training.run import load_segmenter

    config = validate_config(demo_config())
    prepared = demo_run / "results/prepared/fibsem.h5"
    truth = read_split(prepared, "test")
    for backbone in ("filterbank", "tinyvit"):
        run = demo_run / f"results/models/{backbone}/pixelforest/fibsem/none/seed0"
        spec = {**config["backbones"][backbone]}
        model = load_segmenter(run / "model.pt", {})
        features = build_backbone(spec) if reads_tokens("pixelforest", spec["family"]) else None
        with open_h5(
            demo_run / f"results/evaluation/{backbone}/pixelforest/fibsem/none/seed0/fibsem.predictions.h5"
        ) as h:
            name = sorted(h)[0]
            saved = h[name][()]
        image = truth.raw[truth.names.index(name)]
        out = tmp_path / backbone
        predict_images(
            model, features, [(name, image)], parse_view(view_of(config, backbone)), out, pixel_size_of(prepared),
            torch.device("cpu"), pixel_regime=True,
        )  # fmt: skip
        mask = tifffile.imread(out / f"{name}_mask.tif") == 255
        assert (mask == saved.astype(bool)).mean() > 0.999, backbone


def test_demo_is_complete_and_the_figures_target_schedules_only_figures(demo_run):
    assert not scheduled_jobs(snakemake(demo_run, "-n"))
    for figure in (demo_run / "results/figures").iterdir():
        figure.unlink()
    jobs = scheduled_jobs(snakemake(demo_run, "figures", "-n"))
    assert jobs and all(rule.startswith("figure_") or rule == "figures" for rule in jobs), dict(jobs)
    snakemake(demo_run, "figures")
    assert (demo_run / "results/figures/iou_bars.png").exists()


def test_head_change_schedules_no_preparation_tiling_or_features(demo_run, tmp_path):
    config = demo_config()
    config["head"]["width"] = 16
    jobs = scheduled_jobs(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs["train_head"] == 2 * PER_MODEL and jobs["evaluate"] > 0 and jobs["aggregate"] == 1
    assert not UPSTREAM & set(jobs), dict(jobs)


def test_lora_rank_change_reruns_only_lora_and_dependants(demo_run, tmp_path):
    config = demo_config()
    config["lora"]["rank"] = 2
    jobs = scheduled_jobs(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs["train_lora"] == PER_MODEL and jobs["evaluate"] == PER_MODEL
    assert "train_head" not in jobs and not UPSTREAM & set(jobs), dict(jobs)


def test_supervised_override_reruns_only_the_supervised_runs(demo_run, tmp_path):
    config = demo_config()
    config["training"]["overrides"] = {"supervised": {"lr": 2e-3, "augment": "flips_rot90"}}
    jobs = scheduled_jobs(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs["train_supervised"] == PER_MODEL and jobs["evaluate"] == PER_MODEL, dict(jobs)
    assert not {"train_head", "train_lora", "train_pixelforest"} & set(jobs) and not UPSTREAM & set(jobs), dict(jobs)


def test_plot_style_change_reruns_only_figures(demo_run, tmp_path):
    config = demo_config()
    config["figures"] = {"style": "paper", "formats": ["png", "pdf", "svg"]}
    jobs = scheduled_jobs(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs and all(rule.startswith("figure_") or rule in {"all", "figures"} for rule in jobs), dict(jobs)


def test_adding_a_backbone_adds_only_its_jobs(demo_run, tmp_path):
    config = demo_config()
    config["backbones"]["tinyvit2"] = {
        **config["backbones"]["tinyvit"],
        "model_kwargs": {"depth": 2, "embed_dim": 96, "num_heads": 2, "img_size": 112},
    }
    jobs = scheduled_jobs(snakemake(demo_run, "-n", "-p", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs["cache_features"] == 2 and jobs["train_head"] == PER_MODEL and jobs["train_lora"] == PER_MODEL
    assert not {"prepare_dataset", "tile_dataset", "split_validation"} & set(jobs), dict(jobs)


def _jobs_after_editing(demo_run, tmp_path, module):
    """Dry-run the finished demo from a copy of the repository in which ``module`` was edited."""
    copy = tmp_path / "repo"
    shutil.copytree(
        REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "results", "resources", ".snakemake", "__pycache__")
    )
    with open(copy / module, "a") as handle:
        handle.write("\n# an edit\n")
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(copy / "Snakefile"),
        "-d",
        str(demo_run),
        "--profile",
        str(REPO / "profiles/demo"),
        "-n",
    ]
    return scheduled_jobs(subprocess.run(command, capture_output=True, text=True))


@pytest.mark.parametrize(
    ("module", "rerun", "untouched"),
    [
        # aggregate imports metrics directly, evaluate through its own module, and training through
        # the decision rules it chooses on validation (evaluation/decision.py): all rerun.
        (
            "em_foundation/evaluation/metrics.py",
            {"train_head", "evaluate", "aggregate", "report_tables", "figure_iou_bars"},
            UPSTREAM,
        ),
        # train imports alignment/features.py through training.run (the head's standardiser).
        (
            "em_foundation/alignment/features.py",
            {"train_head", "train_lora", "evaluate", "tile_dataset"},
            {"prepare_dataset"},
        ),
        # only the domain analysis imports the probe: its tables, report page and figures rerun.
        (
            "em_foundation/analysis/probe.py",
            {"domain_analysis", "report_tables", "figure_probe"},
            UPSTREAM | {"train_head", "evaluate", "aggregate"},
        ),
        # a new module nothing imports reruns nothing.
        ("em_foundation/unused_helper.py", set(), {"all"}),
    ],
)
def test_editing_a_package_module_reruns_what_imports_it(demo_run, tmp_path, module, rerun, untouched):
    """The code digest in params follows each script's transitive imports."""
    jobs = _jobs_after_editing(demo_run, tmp_path, module)
    assert rerun <= set(jobs), f"{module}: expected {sorted(rerun)} to rerun, got {dict(jobs)}"
    assert not untouched & set(jobs), f"{module}: {sorted(untouched & set(jobs))} reran, got {dict(jobs)}"


def test_changing_one_backbones_weights_reruns_only_its_jobs(demo_run, tmp_path):
    config = demo_config()
    config["backbones"]["tinyvit"]["options"] = {"init_seed": 7}
    jobs = scheduled_jobs(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs["cache_features"] == 2, "only tinyvit's two feature caches"
    assert jobs["train_head"] == jobs["train_lora"] == jobs["train_pixelforest"] == PER_MODEL, dict(jobs)
    assert jobs["evaluate"] == 3 * PER_MODEL, dict(jobs)
    assert not {"prepare_dataset", "tile_dataset", "split_validation"} & set(jobs), dict(jobs)
