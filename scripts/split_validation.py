"""Snakemake entry point: draw the validation slices of one dataset for one seed."""

from em_foundation.data.prepared import read_split
from em_foundation.data.splits import validation_mode, validation_split
from em_foundation.io import write_json
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    names = read_split(snakemake.input[0], "train").names
    p = snakemake.params
    mode, gap, why = validation_mode(p.val_split, p.val_gap, dict(p.test_split))
    split = validation_split(names, p.val_fraction, int(snakemake.wildcards.seed), mode, gap)
    write_json(snakemake.output[0], {"dataset": snakemake.wildcards.dataset, **split, "mode_from": why})
    print(f"seed {split['seed']}: validation slices {split['val']}")
