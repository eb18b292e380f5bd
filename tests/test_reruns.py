"""What a config change reruns, as a property: every key of every block, from the schema.

One finished small run (every regime, two domains, a few epochs) is shared by all cases. For
each key the schema declares, a dry run with that key changed (project defaults: every rerun
trigger) must schedule every job of the rules that read the key, and no job of another rule
may rerun on its own account: those are only dependants ("input files updated by another
job"; Snakemake reports a reader downstream of another rerun that way too). Who reads what comes from the regimes table (training rules) and READERS
below (the other rules); a schema key missing from both fails the test, so a new key needs a
decision. Keys with the same readers are changed together in one dry run (a dry run of this
run costs several seconds on a loaded machine): the test prints how many it ran.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections import Counter

import pytest

from em_foundation.config import ConfigError, load_schema, validate_config
from em_foundation.regimes import REGIMES
from tests.workflow import demo_config, scheduled_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


def small_config() -> dict:
    """The demo cut down to every regime once: two 112 px domains, one training set, one seed, two epochs."""
    config = demo_config()
    for name, seed in (("fibsem", 1), ("sstem", 2)):
        config["datasets"][name]["options"] = {
            "domain": name, "n_train": 4, "n_test": 2, "height": 112, "width": 112, "seed": seed,
        }  # fmt: skip
    config["training_sets"] = {"fibsem": ["fibsem"]}
    config["backbones"]["tinyvit"]["model_kwargs"] = {"depth": 1, "embed_dim": 48, "num_heads": 2, "img_size": 112}
    config["regimes"] = list(REGIMES)
    config["seeds"] = [0]
    config["forest"] = {"n_estimators": 4, "max_depth": 4}
    config["pixelforest"].update(n_estimators=4, max_depth=4, pixels_per_tile=50)
    config["training"].update(max_epochs=2, patience=1, val_fraction=0.25, n_train_slices=["all"])
    config["training"]["n_train_slices_for"] = None
    config["analysis"].update(n_boot=0, n_perm=0, umap=False, pca_dim=4)
    config["evaluation"]["n_boot"] = 0
    config["figures"] = {"formats": ["png"]}
    return config


def training_rules(block: str) -> set[str]:
    """The training rules whose regime reads ``block`` (regimes table)."""
    return {regime.rule for regime in REGIMES.values() if block in regime.blocks}


# Keys that are part of output paths (views, sweeps, formats): a change adds or removes jobs,
# not reruns; other tests check those (test_workflow, test_label_efficiency, test_tiling).
PATH_KEYS = {
    "tiling.mode", "tiling.tile_size", "tiling.overlap", "tiling.pixel_size_nm",
    "training.n_train_slices", "training.n_train_slices_for",
    "alignment.variants", "alignment.train_sets", "evaluation.test_sets", "figures.formats",
}  # fmt: skip
# Keys that cannot be changed to another valid value here, with the reason.
UNCHANGEABLE = {"figures.style": "only one style file (paper) ships"}
# Keys whose generic change would not validate: the value to use instead.
CHANGES = {
    "hub.cache_dir": "elsewhere/weights",
    "predict.images": "new_images",
    "predict.backbone": "tinyvit",
    "predict.regime": "lora",
    "predict.train_set": "fibsem",
    "predict.alignment": "percentile",
    "predict.model": "elsewhere/model.pt",
    "predict.name": "renamed",
    "alignment.reference": "sstem",
    "compute.device": "cuda",
    "analysis.views": ["pooled"],
    "alignment.percentiles": [2.0, 98.0],
    "predict.pixel_size_nm": [5.0, 5.0],
    "training.overrides": {"supervised": {"lr": 1.0e-4}},
    "evaluation.block_length": 2,
}
# The rules (beyond the training rules of the regimes table) that read each key; a key not
# here reads nothing in `all`: alignment's statistics serve aligned variants only (none in
# this run) and predict, the predict block only the target `predict`, and the settings that
# cannot change a number (threads, data_in_memory, the hub cache) are no rerun trigger.
READERS: dict[str, set[str]] = {
    "compute.device": {"cache_features"} | training_rules("training") | training_rules("forest")
    | training_rules("pixelforest") | {"evaluate"},
    "features.batch_size": {"cache_features"},
    **{f"head.{key}": training_rules("head") | {"parameters"} for key in ("width",)},
    **{f"lora.{key}": training_rules("lora") | {"parameters"} for key in ("rank", "alpha", "dropout")},
    **{f"evaluation.{key}": {"evaluate"} for key in ("save_predictions", "objects")},
    **{f"evaluation.{key}": {"aggregate"} for key in ("n_boot", "boot_seed", "block_length", "min_images")},
    # a regime's own recipe reaches that regime's runs only (training/recipe.py)
    "training.overrides": {REGIMES["supervised"].rule},
    **{f"training.{key}": {"split_validation"} | training_rules("training") for key in ("val_fraction", "val_split", "val_gap")},
}  # fmt: skip
NO_READERS = {"compute.threads", "compute.data_in_memory", "hub.cache_dir", "tiling.longest_edge"}
NO_READER_BLOCKS = {"alignment", "predict"}
# blocks read whole by one set of rules
BLOCK_READERS = {
    "forest": training_rules("forest"),
    "pixelforest": training_rules("pixelforest"),
    "training": training_rules("training"),
    "analysis": {"domain_analysis"},
}
# Blocks of names (datasets, backbones, training sets) and lists that span the grid: their
# entries make the paths, checked by test_workflow (adding or changing one backbone).
GRID_BLOCKS = {"datasets", "training_sets", "backbones", "regimes", "seeds"}


def readers_of(key: str) -> set[str]:
    block = key.split(".")[0]
    if key in READERS:
        return READERS[key]
    if key in NO_READERS or block in NO_READER_BLOCKS:
        return set()
    if block in BLOCK_READERS:
        return BLOCK_READERS[block]
    raise KeyError(f"{key}: say in READERS (tests/test_reruns.py) which rules read it")


def schema_keys() -> list[tuple[str, dict]]:
    """(block.key, its schema) of every block with fixed keys."""
    keys = []
    for block, spec in load_schema()["properties"].items():
        if block in GRID_BLOCKS:
            continue
        for key, prop in spec.get("properties", {}).items():
            keys.append((f"{block}.{key}", prop))
    return keys


def changed_value(prop: dict, current):
    """Another valid value of a key, from its schema."""
    types = prop.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if "enum" in prop:
        return next(v for v in prop["enum"] if v != current)
    if "boolean" in types:
        return not current
    if "integer" in types:
        value = (current or prop.get("minimum", 1)) + 1
        return min(value, prop["maximum"]) if "maximum" in prop and value > prop["maximum"] else value
    if "number" in types:
        if current is None:
            return 5.0
        value = current * 0.5 if current else 0.5
        return value
    if "array" in types and isinstance(current, list) and current:
        return current[:-1] if len(current) > prop.get("minItems", 1) else [*current, current[-1]]
    if "object" in types:
        inner = {k: v for k, v in prop.get("properties", {}).items() if k in (current or {})}
        key, schema = next(iter(inner.items()))
        return {**current, key: changed_value(schema, current[key])}
    if "string" in types:
        return f"{current}x"
    raise ValueError(f"no generic change for {prop}")


def own_and_dependant(result) -> tuple[Counter, Counter]:
    """Jobs of a dry run by rule: those rerun on their own account, and those rerun only as dependants."""
    own, dependant = Counter(), Counter()
    reasons: list[tuple[str, str]] = []  # (rule, reason) per job; later jobs of a dry run are indented
    for line in (result.stdout + result.stderr).splitlines():
        started = re.match(r"^\s*(?:local)?rule (\w+):$", line)
        if started:
            reasons.append((started.group(1), ""))
        reason = re.match(r"^\s*reason: (.*)$", line)
        if reason and reasons:
            reasons[-1] = (reasons[-1][0], reason.group(1))
    for rule, reason in reasons:
        causes = [c for c in reason.split("; ") if c]
        if causes and all(c.startswith("Input files updated by another job") for c in causes):
            dependant[rule] += 1
        else:
            own[rule] += 1
    return own, dependant


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("small")
    config = small_config()
    started = time.perf_counter()
    result = snakemake(workdir, configfile=write_config(workdir / "small.yaml", config))
    print(f"small run: {time.perf_counter() - started:.0f} s")
    return workdir, config, scheduled_jobs(result)


def test_every_key_reruns_exactly_the_rules_that_read_it(small_run, tmp_path):
    workdir, base, jobs_of_run = small_run
    rules_of_run = set(jobs_of_run)
    validated = validate_config(copy.deepcopy(base))
    groups: dict[frozenset, list[tuple[str, object]]] = {}
    skipped = []
    for key, prop in schema_keys():
        if key in PATH_KEYS or key in UNCHANGEABLE:
            skipped.append(f"{key} ({'a path' if key in PATH_KEYS else UNCHANGEABLE[key]})")
            continue
        block, name = key.split(".")
        value = CHANGES[key] if key in CHANGES else changed_value(prop, validated[block][name])
        readers = frozenset(readers_of(key) & rules_of_run)
        groups.setdefault(readers, []).append((key, value))
    print("not changed here:", "; ".join(skipped))
    failures, dry_runs, started = [], 0, time.perf_counter()
    for readers, changes in groups.items():
        config = copy.deepcopy(base)
        for key, value in changes:
            block, name = key.split(".")
            config.setdefault(block, {})[name] = value
        keys = ", ".join(k for k, _ in changes)
        try:
            validate_config(copy.deepcopy(config))
        except ConfigError as error:
            raise AssertionError(f"the change of {keys} does not validate; add a value to CHANGES: {error}") from None
        result = snakemake(workdir, "-n", configfile=write_config(tmp_path / f"c{dry_runs}.yaml", config))
        dry_runs += 1
        own, dependant = own_and_dependant(result)
        print(f"{keys}: {dict(own)} rerun, {sum(dependant.values())} dependants")
        # A job downstream of another rerun is reported as a dependant only (Snakemake looks no
        # further), so a reader's jobs may rerun either way; a job of any other rule never on its own.
        if not set(own) <= readers or (readers and not own):
            failures.append(f"{keys}: expected only {sorted(readers)} to rerun on their own, got {dict(own)}")
        short = {
            rule: own[rule] + dependant[rule] for rule in readers if own[rule] + dependant[rule] != jobs_of_run[rule]
        }
        if short:
            failures.append(f"{keys}: not every job reran: {short} of {dict(jobs_of_run)}")
    print(f"{dry_runs} dry runs in {time.perf_counter() - started:.0f} s")
    assert not failures, "\n".join(failures)


def test_settings_that_are_no_trigger_reach_the_job_and_its_record(small_run):
    """threads, data_in_memory and the hub cache are no params, yet every training record keeps them."""
    workdir, config, _ = small_run
    for regime in ("head", "forest", "pixelforest"):
        record = json.loads((workdir / f"results/models/filterbank/{regime}/fibsem/none/seed0/run.json").read_text())
        assert record["compute"] == {
            "device": config["compute"]["device"],
            "threads": config["compute"]["threads"],
            "data_in_memory": "auto",
            "hub_cache_dir": "resources/weights",
        }, regime
