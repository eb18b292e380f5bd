"""Snakemake entry point: run one backbone once over every tile of one dataset."""

from em_foundation.backbones import build_backbone
from em_foundation.backbones.hub import hub_environment
from em_foundation.feature_cache import cache_features
from em_foundation.runtime import configure
from em_foundation.scripting import job_settings, logged

with logged(snakemake.log[0]):
    settings = job_settings(snakemake)
    device = configure(settings)
    spec = dict(snakemake.params.backbone)
    with hub_environment(settings["hub_cache_dir"], offline=True):
        backbone = build_backbone(spec)
    counts = cache_features(
        backbone,
        snakemake.input.tiles,
        snakemake.output[0],
        snakemake.params.features["batch_size"],
        device,
        attrs={"backbone": snakemake.wildcards.backbone, "dataset": snakemake.wildcards.dataset, "spec": spec},
    )
    print(
        f"{snakemake.wildcards.backbone} on {snakemake.wildcards.dataset}: {counts} tiles, identity {backbone.identity}"
    )
