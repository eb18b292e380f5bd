"""The report's HTML pages: one row per model, alignment included."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from em_foundation.report_pages import summary_page


def _row(alignment: str, iou: float) -> dict:
    row = {"backbone": "tinyvit", "regime": "head", "train_set": "paired", "alignment": alignment, "test_set": "fibsem"}
    for metric in ("fg_iou", "fg_dice", "mean_iou"):
        row.update({f"{metric}_mean": iou, f"{metric}_std": 0.01, f"{metric}_n": 2})
    return row


def test_summary_page_keeps_plain_and_aligned_models_apart() -> None:
    # The aligned model comes first, as it did in summary.csv's sort order ("featstd" < "none").
    summary = pd.DataFrame([_row("featstd", 0.9), _row("none", 0.5)])
    html = summary_page(summary)
    first = html.split("</table>")[0]  # the foreground-IoU table
    header = re.findall(r"<th>(.*?)</th>", first)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", first, re.S) if "<td>" in row]
    cells = {row[header.index("alignment")]: row[header.index("fibsem")] for row in rows}
    assert cells == {"featstd": "0.900 ± 0.010 (2)", "none": "0.500 ± 0.010 (2)"}


def test_summary_page_refuses_two_rows_for_one_cell() -> None:
    with pytest.raises(ValueError, match="several rows per model and test set"):
        summary_page(pd.DataFrame([_row("none", 0.9), _row("none", 0.5)]))


def test_summary_page_keeps_label_efficiency_sizes_apart_and_shows_object_f1() -> None:
    rows = []
    for n, iou in (("2", 0.4), ("all", 0.7)):
        row = {**_row("none", iou), "n_train_slices": n}
        row.update({"obj_f1_mean": iou / 2, "obj_f1_std": 0.02, "obj_f1_n": 2})
        rows.append(row)
    html = summary_page(pd.DataFrame(rows))
    first = html.split("</table>")[0]
    header = re.findall(r"<th>(.*?)</th>", first)
    body = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", first, re.S) if "<td>" in row]
    assert {row[header.index("n_train_slices")]: row[header.index("fibsem")] for row in body} == {
        "2": "0.400 ± 0.010 (2)",
        "all": "0.700 ± 0.010 (2)",
    }
    assert "Object F1" in html and "0.350 ± 0.020 (2)" in html


def test_summary_page_cites_the_weights_manifest_entry_of_each_backbone() -> None:
    from em_foundation.backbones.hub import citation_text

    citation = {
        "manifest": "resources/weights/manifest.json",
        "backbone": "dinov2L",
        "identity": "timm/vit_large_patch14_dinov2.lvd142m@abc123",
        "licence": "apache-2.0",
        "files": [{"name": "model.safetensors", "sha256": "f" * 64}],
    }
    text = citation_text(citation)
    assert "sha256:" + "f" * 64 in text and "entry dinov2L" in text and citation["identity"] in text
    assert citation_text(None) == ""
    rows = [{**_row("none", 0.5), "weights": text}, {**_row("none", 0.4), "backbone": "filterbank", "weights": ""}]
    html = summary_page(pd.DataFrame(rows))
    assert "Pretrained weights of each backbone" in html and "f" * 64 in html
    # random or file weights alone: no weights table
    assert "Pretrained weights" not in summary_page(pd.DataFrame([{**_row("none", 0.5), "weights": ""}]))


def test_summary_page_says_when_sd_and_n_pool_seeds_and_folds() -> None:
    html = summary_page(pd.DataFrame([{**_row("none", 0.5), "n_over": "seeds × folds"}]))
    assert "mean ± sample sd (n seeds × folds)" in html
    assert "mean ± sample sd (n seeds)" in summary_page(pd.DataFrame([_row("none", 0.5)]))
