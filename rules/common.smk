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
    return f"results/models/{w.backbone}/{w.regime}/{w.train_set}/seed{w.seed}"


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
FIGURES = expand("results/figures/{name}.{ext}", name=FIGURE_NAMES, ext=config["figures"]["formats"])
