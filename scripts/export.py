"""Snakemake `script:` of export_bioimageio: one trained run as a bioimage.io model package.

The held-out slice is the first test slice of the run's first training dataset; the
scores are the run's metrics on every test set (evaluation/<run>/<test set>.json).
"""

from pathlib import Path

from em_foundation.backbones.hub import hub_environment
from em_foundation.export.bioimageio import export_from_workflow
from em_foundation.scripting import job_settings, logged

with logged(snakemake.log[0]):  # noqa: F821 (snakemake is injected by Snakemake)
    inputs, params = snakemake.input, snakemake.params  # noqa: F821
    with hub_environment(job_settings(snakemake)["hub_cache_dir"], offline=True):  # noqa: F821
        path = export_from_workflow(
            model_path=Path(inputs.model),
            run_path=Path(inputs.run),
            metrics_paths=[Path(p) for p in inputs.metrics],
            prepared_path=Path(inputs.prepared),
            backbone_name=snakemake.wildcards.backbone,  # noqa: F821
            backbone=dict(params.backbone),
            out_zip=Path(snakemake.output[0]),  # noqa: F821
        )
    print(f"bioimage.io package: {path}")
