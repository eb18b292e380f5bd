# Shared helpers: the grid, one helper per output tree (results, logs, benchmarks, as
# PyPSA-Eur's resources()/logs()/benchmarks()), and the code digests that make package
# edits rerun exactly the rules that import them. `snakemake --lint` wants every function
# here rather than beside its rule, so the input functions follow below in sections named
# after the rule file that uses them, in the order the Snakefile includes those files.
from pathlib import Path
from types import SimpleNamespace

from em_foundation import grid
from em_foundation.data.generic import unlabelled_files
from em_foundation.provenance import code_digest as _code_digest
from em_foundation.references import in_domain_training_sets, reference_runs
from em_foundation.regimes import REGIMES, reads_tokens
from em_foundation.training.recipe import training_for

RUNS = grid.runs(config)
# backbones the domain analysis reads features of (whole segmenters, the U-Net, have none)
FEATURE_BACKBONES = grid.feature_backbones(config)
TEST_SETS = grid.test_sets(config)
# One trained model: {backbone}/{regime}/{train_set}/{alignment}/seed{seed}{labels}, written once (in grid);
# {labels} is empty (all training slices) or -n<k> (k labelled slices: training.n_train_slices).
RUN = grid.RUN_PATTERN


wildcard_constraints:
    dataset="[A-Za-z0-9]+",
    backbone="[A-Za-z0-9]+",
    train_set="[A-Za-z0-9]+",
    test_set="[A-Za-z0-9]+",
    regime="[a-z]+",
    seed=r"\d+",
    labels=r"(-n\d+)?",
    view=r"(tile\d+o\d+(nm\d+(\.\d+)?)?|resize\d+p\d+)(-percentile|-histmatch)?(-trans)?",
    variant=r"(nm\d+(\.\d+)?(-(percentile|histmatch)(-trans)?)?|(percentile|histmatch)(-trans)?)",
    alignment=r"none|[a-z]+(-[a-z]+)*",


def results(path):
    return f"results/{path}"


def logs(path):
    return f"results/logs/{path}"


def benchmarks(path):
    return f"results/benchmarks/{path}"


def run_path(regime="{regime}"):
    """The run pattern, with the regime fixed by a regime's own training rule."""
    return RUN.replace("{regime}", regime)


def run_flat(regime="{regime}"):
    """The run pattern as one file name (logs, benchmarks)."""
    return "_".join(Path(run_path(regime)).parts)


def code_digest(script):
    """Hash of a rule's script and every package module it imports, passed as a param.

    Snakemake reruns a job when its params change, so an edit to a module reruns exactly
    the rules whose scripts import it (transitively) and their dependants.
    """
    return _code_digest(Path(workflow.basedir) / "scripts" / script)


def compute_params():
    """The compute settings that can change a number (the device), as a param: a rerun trigger.

    Settings that cannot (compute.threads, compute.data_in_memory, hub.cache_dir) are no
    params: Snakemake's params trigger compares every param with the last run, so they would
    rerun the study for the same numbers. The job reads them from ``snakemake.config``
    (em_foundation.scripting.job_settings), which Snakemake passes to every script but never
    compares, and records them in run.json.
    """
    return {"compute": {"device": config["compute"]["device"]}}


def variant_of(w):
    """The input variant of a run's alignment: 'raw', an intensity normalisation and/or a pixel size."""
    return grid.input_variant(config, w.alignment)


def prepared_path(dataset):
    return results(f"prepared/{dataset}.h5")


def tiles_path(backbone, dataset, variant="raw"):
    """The tiles a backbone sees: shared by all backbones when tiling, per patch size when resizing."""
    return results(f"tiles/{grid.view_of(config, backbone, variant)}/{dataset}.h5")


def features_path(backbone, dataset, variant="raw"):
    """Unaligned features keep the short path; aligned inputs (grid.input_variant) get a folder of their own."""
    if variant == "raw":
        return results(f"features/{backbone}/{dataset}.h5")
    return results(f"features/{backbone}/{variant}/{dataset}.h5")


def model_path(name, regime="{regime}"):
    return results(f"models/{run_path(regime)}/{name}")


def evaluation_path(test_set, suffix, regime="{regime}"):
    return results(f"evaluation/{run_path(regime)}/{test_set}{suffix}")


def train_datasets(w):
    return config["training_sets"][w.train_set]


def weights_input(w):
    """What a backbone's weights depend on: the fetched hub marker, a local file, or nothing."""
    spec = config["backbones"][w.backbone]
    weights = spec["weights"]
    if weights == "random" or spec["family"] not in grid.HUB_FAMILIES:
        return []
    if weights == "pretrained":
        return f"{config['hub']['cache_dir']}/{w.backbone}.json"
    return weights


def figure_outputs(name):
    """A figure in every configured format: PNG into the HTML report with its caption, PDF/SVG for the paper."""
    outputs = {}
    for ext in config["figures"]["formats"]:
        path = results(f"figures/{name}.{ext}")
        outputs[ext] = report(path, caption=f"../report/{name}.rst", category="Figures") if ext == "png" else path
    return outputs


EVALUATIONS = [results(f"evaluation/{run.path}/{test_set}.json") for run in RUNS for test_set in TEST_SETS]
TABLES = [
    results("tables/runs.csv"),
    results("tables/summary.csv"),
    results("tables/summary.md"),
    results("tables/per_image.csv"),
    results("tables/training_logs.csv"),
    results("tables/parameters.csv"),
]


# ---------------------------------------------------------------- rules/data.smk


def dataset_archive(w):
    """Downloaded datasets depend on their archive; generated ones on nothing."""
    return [f"resources/downloads/{w.dataset}.zip"] if config["datasets"][w.dataset]["url"] else []


def tile_sources(w):
    """The prepared slices, plus the reference dataset's for histogram matching."""
    inputs = {"prepared": prepared_path(w.dataset)}
    if grid.parse_view(w.view)["intensity"].startswith("histmatch"):
        reference = config["alignment"]["reference"] or next(iter(config["datasets"]))
        inputs["reference"] = prepared_path(reference)
    return inputs


# ---------------------------------------------------------------- rules/train.smk


def split_inputs(w):
    return {f"split_{d}": results(f"splits/{d}/seed{w.seed}.json") for d in train_datasets(w)}


def tile_inputs(w):
    return {f"tiles_{d}": tiles_path(w.backbone, d, variant_of(w)) for d in train_datasets(w)}


def feature_inputs(w):
    return {f"features_{d}": features_path(w.backbone, d, variant_of(w)) for d in train_datasets(w)}


def token_inputs(regime):
    """The feature caches where ``regime`` on this backbone reads them (em_foundation/regimes.reads_tokens)."""

    def inputs(w):
        return feature_inputs(w) if reads_tokens(regime, config["backbones"][w.backbone]["family"]) else {}

    return inputs


def run_outputs(regime):
    return {
        key: model_path(name, regime)
        for key, name in (("model", "model.pt"), ("log", "train_log.csv"), ("run", "run.json"))
    }


# every config block some training rule reads (regimes table)
TRAIN_BLOCKS = sorted({block for regime in REGIMES.values() for block in regime.blocks})


def regime_training_block(regime):
    """The training keys ``regime`` reads: none for a regime without the training block (the
    forests), else the block less the sweep, which is in the path ({labels}), so that adding
    a sweep leaves the other runs' params as they were."""
    if "training" not in REGIMES[regime].blocks:
        return {}
    # training.overrides.<regime> applies to this regime only (training/recipe.py)
    training = training_for(config["training"], regime)
    return {k: v for k, v in training.items() if k not in grid.SWEEP_KEYS}


def train_params(regime):
    """The regime, the config blocks it uses (regimes table), the device, the code digest.

    Blocks the regime does not use are passed empty: a rule derived with `use rule ... with`
    inherits every param it does not set, so without them a LoRA change would rerun the
    U-Net (derived from train_lora) and a head change the forests (derived from train_head).
    """
    used = REGIMES[regime].blocks
    blocks = {block: (config[block] if block in used else {}) for block in TRAIN_BLOCKS if block != "backbone"}
    blocks["backbone"] = (lambda w: config["backbones"][w.backbone]) if "backbone" in used else {}
    blocks["training"] = regime_training_block(regime)
    return {"regime": regime, "datasets": train_datasets, **blocks, **compute_params(), "code": code_digest("train.py")}


# ---------------------------------------------------------------- rules/evaluate.smk


def evaluation_inputs(w):
    inputs = {
        "model": model_path("model.pt").format(**dict(w.items())),
        "run": model_path("run.json").format(**dict(w.items())),
        "prepared": [prepared_path(dataset) for dataset in TEST_SETS],
        "tiles": [tiles_path(w.backbone, dataset, variant_of(w)) for dataset in TEST_SETS],
    }
    if reads_tokens(w.regime, config["backbones"][w.backbone]["family"]):
        inputs["features"] = [features_path(w.backbone, dataset, variant_of(w)) for dataset in TEST_SETS]
    elif not REGIMES[w.regime].cached:
        inputs["weights"] = weights_input(w)
    return inputs


def object_datasets():
    """What the object scores need of each test set's config: its converter and options (is the
    test split a stack?). The pixel size comes from the prepared file."""
    return {
        test_set: {
            "converter": config["datasets"][test_set]["converter"],
            "options": config["datasets"][test_set].get("options") or {},
        }
        for test_set in TEST_SETS
    }


def per_test_set(suffix):
    return [evaluation_path(test_set, suffix) for test_set in TEST_SETS]


# ---------------------------------------------------------------- rules/analysis.smk


def domain_inputs(w):
    """Every dataset's tiles and unaligned features, as this backbone sees them."""
    return {
        **{f"tiles_{d}": tiles_path(w.backbone, d) for d in config["datasets"]},
        **{f"features_{d}": features_path(w.backbone, d) for d in config["datasets"]},
    }


def report_page(path, caption, category, **labels):
    return report(path, caption=f"../report/{caption}.rst", category=category, labels=labels)


# ---------------------------------------------------------------- rules/figures.smk


def figure_params(name, **extra):
    return {"name": name, "figures": config["figures"], **extra, "code": code_digest("figure.py")}


def analysis_tables(table):
    """One domain-analysis table of every backbone: what a domain figure reads."""
    return expand(results("analysis/{backbone}/{table}.csv"), backbone=FEATURE_BACKBONES, table=table)


def qualitative_runs():
    """Per test set, the in-domain single-dataset models of the first seed, one per backbone × regime."""
    chosen = []
    seed = config["seeds"][0]
    for test_set in TEST_SETS:
        own = [name for name, members in config["training_sets"].items() if members == [test_set]]
        containing = [name for name, members in config["training_sets"].items() if test_set in members]
        train_set = (own or containing or list(config["training_sets"]))[0]
        for run in RUNS:
            if (
                run.train_set == train_set
                and run.seed == seed
                and run.alignment == "none"
                and run.n_train_slices == grid.ALL_SLICES
            ):
                chosen.append((test_set, run))
    return chosen


# ---------------------------------------------------------------- rules/predict.smk

PREDICT = grid.predict_run(config)


def predict_inputs(w):
    """The model (trained by the workflow unless predict.model names a file) and the images.

    The images are inputs, so that a new, removed or changed image reruns predict (a changed
    list of inputs, or a newer file); a missing folder or stack is named by Snakemake.
    """
    if not PREDICT["images"]:
        raise ValueError(
            "the predict target needs images: --config 'predict={images: path/to/folder_or_stack.tif}' "
            "(see README, 'Your own data')"
        )
    run = {key: PREDICT[key] for key in ("backbone", "regime", "train_set", "alignment", "seed")}
    # the model trained on every labelled slice (no label-efficiency suffix)
    inputs = {"model": PREDICT["model"] or model_path("model.pt", regime=run["regime"]).format(**run, labels="")}
    inputs["images"] = [str(file) for _, file in unlabelled_files(PREDICT["images"])]
    if config["predict"]["pixel_size_nm"] is None:
        inputs["prepared"] = prepared_path(config["training_sets"][run["train_set"]][0])
    if REGIMES[run["regime"]].cached or REGIMES[run["regime"]].trains_backbone:
        inputs["weights"] = weights_input(SimpleNamespace(backbone=run["backbone"]))
    if grid.parse_alignment(run["alignment"])["intensity"].startswith("histmatch"):
        inputs["reference"] = prepared_path(config["alignment"]["reference"] or next(iter(config["datasets"])))
    return inputs
