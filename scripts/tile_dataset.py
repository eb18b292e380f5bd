"""Snakemake entry point: cut one prepared dataset into the tiles of one view."""

from em_foundation.data.tiles import tile_dataset
from em_foundation.grid import parse_view
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    view = parse_view(snakemake.wildcards.view)
    counts = tile_dataset(
        snakemake.input.prepared,
        snakemake.output[0],
        view=view,
        reference=snakemake.input.get("reference"),
        percentiles=tuple(snakemake.params.percentiles),
        view_name=snakemake.wildcards.view,
    )
    print(f"tiles per split: {counts}")
