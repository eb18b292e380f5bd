# Shared helpers: the grid, paths, and the code digests that make package edits rerun
# what they touch.
import hashlib
from pathlib import Path

from em_foundation import grid

RUNS = grid.runs(config)
TEST_SETS = grid.test_sets(config)
PACKAGE = Path(workflow.basedir) / "em_foundation"


wildcard_constraints:
    dataset="[A-Za-z0-9]+",
    backbone="[A-Za-z0-9]+",
    train_set="[A-Za-z0-9]+",
    test_set="[A-Za-z0-9]+",
    regime="[a-z]+",
    seed=r"\d+",
    view=r"(tile\d+o\d+|resize\d+p\d+)(-percentile|-histmatch)?(-trans)?",
    intensity="(percentile|histmatch)(-trans)?",
    alignment=r"none|[a-z]+(-[a-z]+)*",


def code_digest(*parts):
    """Hash of the package sources a rule runs, passed as a param.

    Snakemake reruns a job when its params change, so an edit to a helper module reruns
    exactly the stages that import it (and their dependants), never silently nothing.
    """
    digest = hashlib.sha256()
    for part in sorted(parts):
        path = PACKAGE / part
        files = sorted(path.rglob("*.py")) + sorted(path.rglob("*.mplstyle")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(PACKAGE).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


# Modules every stage uses.
CORE = ("io.py", "registry.py", "runtime.py")


def run_dir(w):
    return f"results/models/{w.backbone}/{w.regime}/{w.train_set}/{w.alignment}/seed{w.seed}"


def intensity_of(w):
    return grid.parse_alignment(w.alignment)["intensity"]


def tiles_path(backbone, dataset, intensity="raw"):
    """The tiles a backbone sees: shared by all backbones when tiling, per patch size when resizing."""
    return f"results/tiles/{grid.view_of(config, backbone, intensity)}/{dataset}.h5"


def features_path(backbone, dataset, intensity="raw"):
    """Unaligned features keep the short path; intensity-normalised ones get a folder of their own."""
    if intensity == "raw":
        return f"results/features/{backbone}/{dataset}.h5"
    return f"results/features/{backbone}/{intensity}/{dataset}.h5"


def tile_sources(w):
    """The prepared slices, plus the reference dataset's for histogram matching."""
    inputs = {"prepared": f"results/prepared/{w.dataset}.h5"}
    if grid.parse_view(w.view)["intensity"].startswith("histmatch"):
        reference = config["alignment"]["reference"] or next(iter(config["datasets"]))
        inputs["reference"] = f"results/prepared/{reference}.h5"
    return inputs


def train_datasets(w):
    return config["training_sets"][w.train_set]


def weights_input(w):
    """What a backbone's weights depend on: the fetched hub marker, a local file, or nothing."""
    spec = config["backbones"][w.backbone]
    weights = spec["weights"]
    if weights == "random" or spec["family"] == "filterbank":
        return []
    if weights == "pretrained":
        return f"{config['hub']['cache_dir']}/{w.backbone}.json"
    return weights


EVALUATIONS = expand(
    "results/evaluation/{run}/{test_set}.json",
    run=[run.path for run in RUNS],
    test_set=TEST_SETS,
)
TABLES = [
    "results/tables/runs.csv",
    "results/tables/summary.csv",
    "results/tables/summary.md",
    "results/tables/per_image.csv",
    "results/tables/training_logs.csv",
]
FIGURE_NAMES = ["iou_bars", "cross_domain", "qualitative", "learning_curves"]
if set(config["alignment"]["variants"]) - {"none"}:
    FIGURE_NAMES.append("alignment")
FIGURES = expand("results/figures/{name}.{ext}", name=FIGURE_NAMES, ext=config["figures"]["formats"])


# used by rules/data.smk
def dataset_archive(w):
    """Downloaded datasets depend on their archive; generated ones on nothing."""
    return [f"resources/downloads/{w.dataset}.zip"] if config["datasets"][w.dataset]["url"] else []


# used by rules/train.smk
RUN_OUTPUTS = {
    "model": "results/models/{backbone}/{regime}/{train_set}/{alignment}/seed{seed}/model.pt",
    "log": "results/models/{backbone}/{regime}/{train_set}/{alignment}/seed{seed}/train_log.csv",
    "run": "results/models/{backbone}/{regime}/{train_set}/{alignment}/seed{seed}/run.json",
}


# used by rules/train.smk
def split_inputs(w):
    return {f"split_{d}": f"results/splits/{d}/seed{w.seed}.json" for d in train_datasets(w)}


# used by rules/train.smk
def tile_inputs(w):
    return {f"tiles_{d}": tiles_path(w.backbone, d, intensity_of(w)) for d in train_datasets(w)}


# used by rules/train.smk
def feature_inputs(w):
    return {f"features_{d}": features_path(w.backbone, d, intensity_of(w)) for d in train_datasets(w)}


# used by rules/train.smk
def run_outputs(regime):
    return {key: path.replace("{regime}", regime) for key, path in RUN_OUTPUTS.items()}


# used by rules/evaluate.smk
EVALUATION_STEM = "results/evaluation/{backbone}/{regime}/{train_set}/{alignment}/seed{seed}"


# used by rules/evaluate.smk
def evaluation_inputs(w):
    run = run_dir(w)
    inputs = {
        "model": f"{run}/model.pt",
        "run": f"{run}/run.json",
        "prepared": expand("results/prepared/{dataset}.h5", dataset=TEST_SETS),
        "tiles": [tiles_path(w.backbone, dataset, intensity_of(w)) for dataset in TEST_SETS],
    }
    if w.regime in grid.CACHED_REGIMES:
        inputs["features"] = [features_path(w.backbone, dataset, intensity_of(w)) for dataset in TEST_SETS]
    else:
        inputs["weights"] = weights_input(w)
    return inputs


# used by rules/evaluate.smk
def per_test_set(suffix):
    return [f"{EVALUATION_STEM}/{test_set}{suffix}" for test_set in TEST_SETS]


# used by rules/figures.smk
def qualitative_runs():
    """Per test set, the in-domain single-dataset models of the first seed, one per backbone × regime."""
    chosen = []
    seed = config["seeds"][0]
    for test_set in TEST_SETS:
        own = [name for name, members in config["training_sets"].items() if members == [test_set]]
        containing = [name for name, members in config["training_sets"].items() if test_set in members]
        train_set = (own or containing or list(config["training_sets"]))[0]
        for run in RUNS:
            if run.train_set == train_set and run.seed == seed and run.alignment == "none":
                chosen.append((test_set, run))
    return chosen


# used by rules/figures.smk
def figure_outputs(name):
    """PNG goes into the HTML report; PDF is for the paper."""
    outputs = {}
    for ext in config["figures"]["formats"]:
        path = f"results/figures/{name}.{ext}"
        outputs[ext] = report(path, caption=f"../report/{name}.rst", category="Figures") if ext == "png" else path
    return outputs
