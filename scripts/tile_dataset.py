"""Snakemake entry point: cut one prepared dataset into overlapping tiles."""

from em_foundation.data.tiles import tile_dataset
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    tiling = snakemake.params.tiling
    counts = tile_dataset(snakemake.input[0], snakemake.output[0], tiling["tile_size"], tiling["overlap"])
    print(f"tiles per split: {counts}")
