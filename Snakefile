# Are vision foundation models foundational for EM segmentation? The experiment DAG.
#
#   download → prepare → tile → cache features per backbone → train (head, LoRA, ...) →
#   evaluate every model on every test set at native resolution → tables → figures
#
# Run from anywhere: snakemake -s <repo>/Snakefile -d <workdir> [--profile <repo>/profiles/demo]
# Everything is written under <workdir>/results and <workdir>/resources.
import os

from snakemake.utils import min_version

min_version("9.0")


report: "report/workflow.rst"

# With no --configfile, the published setup (config.yaml) or a named preset (the demo
# profile passes --config preset=demo) is the config; a --configfile replaces it whole.
PRESETS = {
    "published": "config.yaml",
    "demo": "profiles/demo/workflow_config.yaml",
    "extended": "profiles/extended/workflow_config.yaml",
}
if not workflow.overwrite_configfiles:
    preset = config.get("preset", "published")
    if preset not in PRESETS:
        raise ValueError(f"--config preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")

    configfile: os.path.join(workflow.basedir, PRESETS[preset])


config.pop("preset", None)

from em_foundation.config import validate_config

validate_config(config, source=", ".join(map(str, workflow.configfiles)) or "config")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/backbones.smk"
include: "rules/features.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/tables.smk"
include: "rules/analysis.smk"
include: "rules/figures.smk"


localrules:
    all,
    figures,
    download_dataset,
    fetch_weights,


rule all:
    default_target: True
    input:
        TABLES,
        ANALYSIS,
        FIGURES,
        ANALYSIS_FIGURES,


rule figures:
    input:
        FIGURES,
        ANALYSIS_FIGURES,
