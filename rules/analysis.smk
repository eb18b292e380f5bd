# Domain analysis: how far apart the datasets lie in each backbone's feature space.
# (Filled in by the domain-analysis stage; the Snakefile adds these lists to `all`.)

ANALYSIS = []
ANALYSIS_FIGURES = []
