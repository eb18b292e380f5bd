"""Snakemake entry point: gather every evaluation and training log into the tables."""

from pathlib import Path

import pandas as pd

from em_foundation.io import read_json, write_csv, write_text
from em_foundation.scripting import logged
from em_foundation.tables import apply_folds, collect_runs, paired_differences, summarise, summary_markdown

with logged(snakemake.log[0]):
    per_image = pd.concat([pd.read_csv(path) for path in snakemake.input.images], ignore_index=True)
    params = snakemake.params
    folds = dict(params.folds)
    boot = dict(n_boot=params.n_boot, boot_seed=params.boot_seed, folds=folds)
    boot.update(block_length=params.block_length, min_images=params.min_images)
    runs = collect_runs(snakemake.input.metrics, per_image, **boot)
    summary = summarise(runs, per_image, **boot)
    paired = paired_differences(runs, per_image, **boot)
    per_image = apply_folds(per_image, folds) if folds else per_image
    logs = []
    for path in snakemake.input.logs:
        record = read_json(Path(path).with_name("run.json"))
        log = pd.read_csv(path)
        logs.append(
            log.assign(
                backbone=record["backbone_name"],
                regime=record["regime"],
                train_set=record["train_set"],
                alignment=record.get("alignment", "none"),
                seed=record["seed"],
                n_train_slices=str(record.get("n_train_slices", "all")),
                best_epoch=record["best_epoch"],
                stop_reason=record["stop_reason"],
            )
        )
    outputs = snakemake.output
    for frame, path in (
        (runs, outputs.runs),
        (summary, outputs.summary),
        (per_image, outputs.per_image),
        (paired, outputs.paired),
        (pd.concat(logs, ignore_index=True), outputs.training_logs),
    ):
        write_csv(frame, path)
    markdown = summary_markdown(summary)
    if "obj_f1_mean" in summary.columns:
        markdown += "\n" + summary_markdown(summary, "obj_f1")
    write_text(outputs.markdown, markdown)
    print(markdown)
