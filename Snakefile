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


# With no --configfile, the published setup (config.yaml) or a named preset
# (--config preset=demo) is the config. A --configfile replaces it whole (the demo profile
# passes profiles/demo/workflow_config.yaml that way), unless a preset is named explicitly;
# --config key=value changes one key of whichever config is in force, so
# `--profile profiles/demo --config seeds=[0]` is the demo with one seed.
PRESETS = {
    "published": "config.yaml",
    "demo": "profiles/demo/workflow_config.yaml",
    "extended": "profiles/extended/workflow_config.yaml",
}
preset = config.get("preset")
if preset is not None and preset not in PRESETS:
    raise ValueError(f"--config preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
if not workflow.overwrite_configfiles:
    CONFIG_SOURCE = os.path.join(workflow.basedir, PRESETS[preset or "published"])

    configfile: CONFIG_SOURCE

elif preset is not None:
    # An explicit preset wins over a profile's config file (profiles/demo passes one):
    # start again from the preset, then apply the --config values on top.
    import yaml
    from snakemake.utils import update_config

    CONFIG_SOURCE = os.path.join(workflow.basedir, PRESETS[preset])
    with open(CONFIG_SOURCE) as handle:
        config.clear()
        config.update(yaml.safe_load(handle))
    update_config(config, dict(workflow.config_settings.config))
else:
    CONFIG_SOURCE = ", ".join(map(str, workflow.configfiles))


config.pop("preset", None)

from snakemake.logging import logger

from em_foundation.config import validate_config

validate_config(
    config,
    source=CONFIG_SOURCE,
    command_line={k: v for k, v in workflow.config_settings.config.items() if k != "preset"},
    layering_hint=(
        "A --configfile replaces the preset whole; to change only some values, layer your file on a preset: "
        f"--configfile {os.path.join(workflow.basedir, PRESETS['published'])} yours.yaml "
        f"(or {os.path.join(workflow.basedir, PRESETS['demo'])} for the demo); later files override "
        "earlier ones. Single values can also be set with --config key=value."
    ),
    warn=logger.warning,
)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/backbones.smk"
include: "rules/features.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/tables.smk"
include: "rules/analysis.smk"
include: "rules/figures.smk"
include: "rules/predict.smk"
include: "rules/export.smk"


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


rule figures:
    input:
        FIGURES,
