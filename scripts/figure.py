"""Snakemake entry point: draw the figure the rule names (params.name) in the configured style."""

from em_foundation.figures.registry import build_figure
from em_foundation.figures.style import save_figure, use_style
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    params = snakemake.params
    use_style(params.figures["style"])
    inputs = {
        key: [str(path) for path in (paths if isinstance(paths, list) else [paths])]
        for key, paths in snakemake.input.items()
    }
    figure = build_figure(
        params.name,
        inputs,
        {key: params.get(key) for key in ("panels", "training_sets") if params.get(key) is not None},
    )
    save_figure(figure, list(snakemake.output))
    print(f"wrote {', '.join(snakemake.output)}")
