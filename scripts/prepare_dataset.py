"""Snakemake entry point: convert one dataset into the prepared HDF5 and its integrity report."""

from pathlib import Path

from em_foundation.data.convert import prepare_dataset
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    archive = Path(snakemake.input[0]) if len(snakemake.input) else None
    report = prepare_dataset(
        snakemake.wildcards.dataset,
        dict(snakemake.params.dataset),
        archive,
        Path(snakemake.output.h5),
        Path(snakemake.output.report),
    )
    for split, info in report["splits"].items():
        print(
            f"{split}: {info['n_slices']} slices of {info['shape']}, foreground {info['foreground_fraction_mean']:.3f}"
        )
