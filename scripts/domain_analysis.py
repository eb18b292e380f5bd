"""Snakemake entry point: domain analysis of one backbone's cached features across datasets."""

import json

from em_foundation.analysis.run import analyse_backbone, plain
from em_foundation.io import write_csv, write_text
from em_foundation.scripting import logged, unpack_prefixed

with logged(snakemake.log[0]):
    tables, summary = analyse_backbone(
        snakemake.wildcards.backbone,
        unpack_prefixed(snakemake.input, "features_"),
        unpack_prefixed(snakemake.input, "tiles_"),
        dict(snakemake.params.analysis),
        after_featstd=snakemake.params.get("after_featstd", False),
    )
    for name, frame in tables.items():
        write_csv(frame, snakemake.output[name])
    write_text(snakemake.output.summary, json.dumps(plain(summary), indent=2) + "\n")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {', '.join(snakemake.output)} in {summary['seconds']} s")
