"""Snakemake entry point: write the report's HTML pages (em_foundation/report_pages.py)."""

import json

import pandas as pd

from em_foundation.io import write_text
from em_foundation.report_pages import analysis_page, dataset_page, summary_page
from em_foundation.scripting import logged, unpack_prefixed

with logged(snakemake.log[0]):
    write_text(snakemake.output.summary, summary_page(pd.read_csv(snakemake.input.summary)))
    for dataset, path in unpack_prefixed(snakemake.input, "integrity_").items():
        with open(path) as handle:
            write_text(snakemake.output[f"dataset_{dataset}"], dataset_page(json.load(handle)))
    analysis = unpack_prefixed(snakemake.input, "analysis_")
    for backbone in snakemake.params.backbones:
        frames = {name: pd.read_csv(analysis[f"{backbone}_{name}"]) for name in snakemake.params.tables}
        write_text(snakemake.output[f"analysis_{backbone}"], analysis_page(backbone, frames))
    print(f"wrote {', '.join(snakemake.output)}")
