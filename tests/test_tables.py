"""Tables: one row per run and test set, union rows for multi-dataset models, sample std."""

import json

import numpy as np
import pandas as pd
import pytest

from em_foundation.tables import collect_runs, summarise, summary_markdown


def write_metrics(tmp_path, train_set, datasets, seed, test_set, tp, fp, fn, tn):
    from em_foundation.evaluation.metrics import Counts, scores

    path = tmp_path / f"{train_set}_{seed}_{test_set}.json"
    record = {
        "backbone": "b",
        "regime": "head",
        "train_set": train_set,
        "seed": seed,
        "test_set": test_set,
        "train_datasets": datasets,
        **scores(Counts(tp, fp, fn, tn)),
        "n_images": 2,
    }
    path.write_text(json.dumps(record))
    return path


def test_union_rows_pool_pixels_and_summary_uses_sample_std(tmp_path):
    files = []
    for seed, tp in ((0, 50), (1, 70)):
        files.append(write_metrics(tmp_path, "paired", ["a", "c"], seed, "a", tp, 10, 10, 930))
        files.append(write_metrics(tmp_path, "paired", ["a", "c"], seed, "c", 5, 20, 20, 955))
        files.append(write_metrics(tmp_path, "a", ["a"], seed, "c", 1, 1, 1, 997))
    runs = collect_runs(files)
    union = runs[runs.test_set == "a+c"]
    assert len(union) == 2 and union["in_domain"].all()
    row = union[union.seed == 0].iloc[0]
    assert row["fg_iou"] == pytest.approx(55 / (55 + 30 + 30))
    assert row["n_pixels"] == 2000
    assert not runs[(runs.train_set == "a") & (runs.test_set == "c")]["in_domain"].any()
    summary = summarise(runs)
    cell = summary[(summary.train_set == "paired") & (summary.test_set == "a")].iloc[0]
    ious = runs[(runs.train_set == "paired") & (runs.test_set == "a")]["fg_iou"]
    assert cell["fg_iou_std"] == pytest.approx(np.std(ious, ddof=1)) and cell["fg_iou_n"] == 2
    assert "± " in summary_markdown(summary)


def test_summary_markdown_leaves_a_cell_empty_where_a_model_was_not_scored(tmp_path):
    files = [
        write_metrics(tmp_path, "paired", ["a", "c"], 0, "a", 50, 10, 10, 930),
        write_metrics(tmp_path, "a", ["a"], 0, "c", 1, 1, 1, 997),
    ]  # model "a" is never scored on "a"
    markdown = summary_markdown(summarise(collect_runs(files)))
    print(markdown)
    assert "nan" not in markdown.lower()
    row = next(
        line for line in markdown.splitlines() if line.startswith("| b ") and "| a " in line[:40] and "none" in line
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "" and cells[5].startswith("0.333 ± n/a (1)"), cells


def _per_image_rows(train_set, seed, test_set, counts):
    return [
        {
            "backbone": "b",
            "regime": "head",
            "train_set": train_set,
            "alignment": "none",
            "seed": seed,
            "test_set": test_set,
            "image": str(k),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": 1000 - tp - fp - fn,
        }
        for k, (tp, fp, fn) in enumerate(counts)
    ]


def _write_run(tmp_path, train_set, datasets, seed, test_set, counts):
    total = np.sum(counts, axis=0)
    path = write_metrics(
        tmp_path,
        train_set,
        datasets,
        seed,
        test_set,
        int(total[0]),
        int(total[1]),
        int(total[2]),
        1000 * len(counts) - int(total.sum()),
    )
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_images": len(counts)}))
    return path, _per_image_rows(train_set, seed, test_set, counts)


def test_image_bootstrap_interval_per_run_and_per_cell(tmp_path):
    rng = np.random.default_rng(3)
    files, rows = [], []
    for seed in (0, 1):
        for test_set, n in (("a", 12), ("c", 3)):
            counts = [(int(tp), int(rng.integers(5, 40)), int(rng.integers(5, 40))) for tp in rng.integers(20, 200, n)]
            path, images = _write_run(tmp_path, "paired", ["a", "c"], seed, test_set, counts)
            files.append(path)
            rows += images
    per_image = pd.DataFrame(rows)
    runs = collect_runs(files, per_image, n_boot=500, boot_seed=0)
    assert {"fg_iou_ci_low", "fg_iou_ci_high", "n_images"} <= set(runs.columns)
    enough = runs[runs.test_set != "c"]
    assert (enough["fg_iou_ci_low"] < enough["fg_iou"]).all() and (enough["fg_iou"] < enough["fg_iou_ci_high"]).all()
    # 3 test images: no interval, and the table says why
    few = runs[runs.test_set == "c"]
    assert few["fg_iou_ci_low"].isna().all() and (few["fg_iou_ci_note"] == "too few test images (3 < 10)").all()
    assert (enough["fg_iou_ci_note"] == "").all()
    width = (runs["fg_iou_ci_high"] - runs["fg_iou_ci_low"]).set_axis(runs["test_set"])
    assert (
        set(runs["test_set"]) == {"a", "c", "a+c"} and runs.loc[runs.test_set == "a+c", "fg_iou_ci_low"].notna().all()
    )
    # Deterministic with the seed, different with another seed.
    again = collect_runs(files, per_image, n_boot=500, boot_seed=0)
    assert again["fg_iou_ci_low"].fillna(-1).tolist() == runs["fg_iou_ci_low"].fillna(-1).tolist()
    other = collect_runs(files, per_image, n_boot=500, boot_seed=1)
    assert other["fg_iou_ci_low"].tolist() != runs["fg_iou_ci_low"].tolist()
    summary = summarise(runs, per_image, n_boot=500, boot_seed=0)
    cell = summary[summary.test_set == "a"].iloc[0]
    assert cell["fg_iou_ci_low"] < cell["fg_iou_mean"] < cell["fg_iou_ci_high"] and cell["n_images"] == 12
    assert (
        width.loc["a"].max() < 1
        and "[" in summary_markdown(summary)
        and "bootstrap interval over test images" in summary_markdown(summary)
    )


def test_image_interval_shrinks_with_more_images_and_keeps_strata():
    from em_foundation.tables import pooled_iou_interval

    rng = np.random.default_rng(0)

    def interval(n):
        counts = np.stack([rng.integers(10, 200, n), rng.integers(0, 60, n), rng.integers(0, 60, n)], axis=1)[None]
        low, high = pooled_iou_interval(counts, np.array(["a"] * n), 400, 0, min_images=2)
        return high - low

    assert interval(200) < interval(5)
    # Two strata: one perfect image in "a", one empty-of-foreground-hits image in "c"; resampling
    # within strata always keeps one of each, so the pooled IoU cannot move.
    counts = np.array([[[10, 0, 0], [0, 10, 0]]])
    assert pooled_iou_interval(counts, np.array(["a", "c"]), 200, 0, min_images=2) == (0.5, 0.5)
    # Without strata it would move.
    low, high = pooled_iou_interval(counts, np.array(["a", "a"]), 200, 0, min_images=2)
    assert low < 0.5 < high or (low, high) != (0.5, 0.5)


def test_transductive_column_marks_test_image_statistics(tmp_path):
    files = []
    for alignment in ("none", "featstd", "featstd-trans", "percentile-adabn-trans"):
        path = write_metrics(tmp_path, "a", ["a"], 0, "a", 5, 1, 1, 93)
        target = tmp_path / f"{alignment}.json"
        target.write_text(json.dumps({**json.loads(path.read_text()), "alignment": alignment}))
        files.append(target)
    runs = collect_runs(files)
    assert runs.set_index("alignment")["transductive"].to_dict() == {
        "featstd": False,
        "featstd-trans": True,
        "none": False,
        "percentile-adabn-trans": True,
    }
    summary = summarise(runs)
    assert summary.set_index("alignment")["transductive"].to_dict()["featstd-trans"] == True  # noqa: E712


def test_k_folds_are_a_run_dimension_without_cross_fold_scores(tmp_path):
    """Two folds of 'v': each fold's model is scored on its own fold only; a model that
    never saw 'v' keeps its score on both folds; the cell pools seeds × folds."""
    folds = {"vfold0": ["v", 0], "vfold1": ["v", 1], "pfold0": ["p", 0], "pfold1": ["p", 1]}
    rng = np.random.default_rng(0)
    files, rows = [], []
    for seed in (0, 1):
        for train_set, members in (("vfold0", ["vfold0"]), ("vfold1", ["vfold1"]), ("a", ["a"])):
            for test_set in ("vfold0", "vfold1"):
                counts = [(int(tp), 10, 10) for tp in rng.integers(20, 100, 6)]
                path, images = _write_run(tmp_path, train_set, members, seed, test_set, counts)
                target = tmp_path / f"{train_set}-{test_set}-{seed}.json"
                target.write_text(path.read_text())
                files.append(target)
                rows += [{**row, "image": f"{test_set}-{row['image']}"} for row in images]
    per_image = pd.DataFrame(rows)
    runs = collect_runs(files, per_image, n_boot=200, folds=folds)
    assert set(runs["train_set"]) == {"v", "a"} and set(runs["test_set"]) == {"v"}
    assert len(runs[runs.train_set == "v"]) == 2 * 2, "one row per fold and seed: no cross-fold scores"
    assert sorted(runs[runs.train_set == "a"]["fold"]) == [0, 0, 1, 1]
    # 6 test sections per fold: no interval per run, one for the cell over both folds' 12
    assert runs["fg_iou_ci_low"].isna().all() and (runs["fg_iou_ci_note"] == "too few test images (6 < 10)").all()
    summary = summarise(runs, per_image, n_boot=200, folds=folds)
    cell = summary[summary.train_set == "v"].iloc[0]
    assert cell["fg_iou_n"] == 4 and cell["folds"] == "0 1" and cell["n_images"] == 12
    assert cell["n_over"] == "seeds × folds" and "over seeds × folds (n seeds × folds)" in summary_markdown(summary)
    assert cell["fg_iou_ci_low"] < cell["fg_iou_mean"] < cell["fg_iou_ci_high"]


def test_kfold_config_expands_datasets_and_training_sets():
    import yaml

    from em_foundation.config import validate_config
    from em_foundation.grid import fold_names, test_sets
    from em_foundation.grid import runs as grid_runs
    from tests.workflow import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"]["vnc"]["options"] = {"split": "kfold", "n_folds": 4, "gap": 1}
    config = validate_config(config)
    assert test_sets(config) == ["lucchi", "vncfold0", "vncfold1", "vncfold2", "vncfold3"]
    assert config["training_sets"]["pairedfold2"] == ["lucchi", "vncfold2"] and "vnc" not in config["training_sets"]
    assert fold_names(config)["pairedfold2"] == ["paired", 2] and fold_names(config)["vncfold3"] == ["vnc", 3]
    assert {run.train_set for run in grid_runs(config)} == {
        "lucchi",
        *(f"{t}fold{k}" for t in ("vnc", "paired") for k in range(4)),
    }
    assert validate_config(config)["datasets"] == config["datasets"], "expanding twice changes nothing"


def test_object_scores_reach_runs_and_summary_and_unions_pool_their_counts(tmp_path):
    from em_foundation.evaluation.objects import ObjectCounts, scores_columns

    files = []
    for seed, tp in ((0, 2), (1, 4)):
        for test_set, three_d in (("a", ObjectCounts(tp, 5, 5, 0.8 * tp, 1, 0)), ("c", None)):
            path = write_metrics(tmp_path, "paired", ["a", "c"], seed, test_set, 50, 10, 10, 930)
            record = json.loads(path.read_text())
            record.update(scores_columns(ObjectCounts(tp, 5, 6, 0.7 * tp, 0, 1)))
            record.update(scores_columns(three_d, "_3d"))
            path.write_text(json.dumps(record))
            files.append(path)
    runs = collect_runs(files)
    row = runs[(runs.test_set == "a+c") & (runs.seed == 0)].iloc[0]
    assert row["obj_f1"] == pytest.approx(2 * 4 / (12 + 10)) and row["n_true_objects"] == 10
    assert np.isnan(row["obj_f1_3d"])  # c is no stack: no 3-D score for the union
    summary = summarise(runs)
    cell = summary[summary.test_set == "a"].iloc[0]
    assert cell["obj_f1_mean"] == pytest.approx((2 * 2 / 11 + 2 * 4 / 11) / 2)
    assert cell["obj_f1_3d_mean"] == pytest.approx((2 * 2 / 10 + 2 * 4 / 10) / 2) and cell["obj_f1_3d_n"] == 2
    assert "Object F1" in summary_markdown(summary, "obj_f1")


def test_paired_table_gives_each_union_minus_single_with_a_paired_interval(tmp_path):
    """paired.csv: the union's model − the single-dataset model on the same 'a' test images,
    with an interval from resampling those images for both; 'c' has 3 images: no interval."""
    from em_foundation.tables import paired_differences

    rng = np.random.default_rng(5)
    truth_a, truth_c = rng.integers(100, 400, 30), rng.integers(100, 400, 3)
    files, rows = [], []
    for seed in (0, 1):
        for train_set, datasets, gain in (("a", ["a"], 0.0), ("c", ["c"], 0.0), ("ac", ["a", "c"], 0.1)):
            for test_set, truth in (("a", truth_a), ("c", truth_c)):
                if test_set not in datasets and train_set != "ac":
                    continue
                iou = np.clip(0.5 + gain + 0.01 * rng.normal(size=len(truth)), 0, 1)
                counts = [(int(t * q), int(t * (1 - q) / 2), int(t * (1 - q) / 2)) for t, q in zip(truth, iou)]
                path, images = _write_run(tmp_path, train_set, datasets, seed, test_set, counts)
                files.append(path)
                rows += images
    per_image = pd.DataFrame(rows)
    runs = collect_runs(files, per_image, n_boot=300)
    paired = paired_differences(runs, per_image, n_boot=300).set_index("test_set")
    assert set(paired.index) == {"a", "c"} and (paired["train_set_a"] == "ac").all()
    summary = summarise(runs, per_image, n_boot=0).set_index(["train_set", "test_set"])["fg_iou_mean"]
    row = paired.loc["a"]
    assert row["fg_iou_diff"] == pytest.approx(summary[("ac", "a")] - summary[("a", "a")])
    assert row["fg_iou_diff_ci_low"] < row["fg_iou_diff"] < row["fg_iou_diff_ci_high"]
    assert row["fg_iou_diff_ci_low"] > 0.05 and (row["n_images"], row["n_runs_a"], row["n_runs_b"]) == (30, 2, 2)
    assert (
        np.isnan(paired.loc["c", "fg_iou_diff_ci_low"]) and paired.loc["c", "ci_note"] == "too few test images (3 < 10)"
    )
