"""Tables: one row per run and test set, union rows for multi-dataset models, sample std."""

import json

import numpy as np
import pytest

from em_foundation.tables import collect_runs, summarise, summary_markdown


def write_metrics(tmp_path, train_set, datasets, seed, test_set, tp, fp, fn, tn):
    from em_foundation.evaluation.metrics import Counts, scores

    path = tmp_path / f"{train_set}_{seed}_{test_set}.json"
    record = {"backbone": "b", "regime": "head", "train_set": train_set, "seed": seed, "test_set": test_set,
              "train_datasets": datasets, **scores(Counts(tp, fp, fn, tn)), "n_images": 2}
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
    files = [write_metrics(tmp_path, "paired", ["a", "c"], 0, "a", 50, 10, 10, 930),
             write_metrics(tmp_path, "a", ["a"], 0, "c", 1, 1, 1, 997)]  # model "a" is never scored on "a"
    markdown = summary_markdown(summarise(collect_runs(files)))
    print(markdown)
    assert "nan" not in markdown.lower()
    row = next(line for line in markdown.splitlines() if line.startswith("| b ") and "| a " in line[:40] and "none" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "" and cells[5].startswith("0.333 ± n/a (1)"), cells
