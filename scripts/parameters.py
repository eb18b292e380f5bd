"""Snakemake `script:` of the parameters rule: total and trainable parameters per backbone x regime.

Backbones are built from random weights on the meta device: nothing is downloaded.
"""

from em_foundation.backbones.parameters import parameter_table
from em_foundation.io import write_csv
from em_foundation.scripting import logged

with logged(snakemake.log[0]):  # noqa: F821 (snakemake is injected by Snakemake)
    params = snakemake.params  # noqa: F821
    config = {
        "backbones": dict(params.backbones),
        "regimes": list(params.regimes),
        "head": dict(params.head),
        "lora": dict(params.lora),
    }
    table = parameter_table(config)
    write_csv(table, snakemake.output[0])  # noqa: F821
    print(table.to_string(index=False))
