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
    # every figure-specific param (figure_params' extras); name, style and code digest are the rule's
    extras = {key: value for key, value in params.items() if key not in ("name", "figures", "code")}
    figure = build_figure(params.name, inputs, extras)
    save_figure(figure, list(snakemake.output))
    print(f"wrote {', '.join(snakemake.output)}")
