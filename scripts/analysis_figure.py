"""Snakemake entry point: draw one domain-analysis or paired-training figure (named by the rule)."""

from em_foundation.figures.analysis_plots import build_analysis_figure
from em_foundation.figures.style import save_figure, use_style
from em_foundation.scripting import logged

with logged(snakemake.log[0]):
    name = snakemake.rule.removeprefix("figure_")
    use_style(snakemake.params.figures["style"])
    inputs = {key: [str(path) for path in (paths if isinstance(paths, list) else [paths])]
              for key, paths in snakemake.input.items()}
    figure = build_analysis_figure(name, inputs, {k: v for k, v in snakemake.params.items() if k != "code"})
    save_figure(figure, list(snakemake.output))
    print(f"wrote {', '.join(snakemake.output)}")
