"""Snakemake entry point: draw one figure (named by the rule) in the configured style."""

from em_foundation.figures.build import build_figure
from em_foundation.figures.style import save_figure, use_style
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    name = snakemake.rule.removeprefix("figure_")
    use_style(snakemake.params.figures["style"])
    inputs = {"table": snakemake.input[0]} if name != "qualitative" else {
        "prepared": list(snakemake.input.prepared), "predictions": list(snakemake.input.predictions)}
    figure = build_figure(name, inputs, snakemake.params.get("panels"))
    save_figure(figure, list(snakemake.output))
    print(f"wrote {', '.join(snakemake.output)}")
