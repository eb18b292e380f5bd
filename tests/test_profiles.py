"""The workflow profile (profiles/default) on top of a user's own SLURM site profile.

No cluster needed: dry-runs only. tests/test_slurm.py runs the same profiles on a real one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PROFILE = REPO / "profiles" / "default" / "config.yaml"
# Rules that need a GPU; every other rule runs on CPUs (train_forest: a random forest on cached features).
GPU_RULES = {"cache_features", "cache_features_aligned", "train_head", "train_lora", "train_fullft", "train_supervised"}
SUMMARY_RULES = {"aggregate", "domain_analysis", "parameters", "report_tables"}
# A cluster user's generic profile, written long before they met this workflow.
SITE_PROFILE = {
    "executor": "slurm",
    "jobs": 50,
    "default-resources": {"slurm_partition": "standard", "slurm_account": "mylab"},
}


def _jobs_with_resources(text: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry-run prints."""
    jobs = []
    for rule, resources in re.findall(r"^(?:localrule|rule) (\w+):\n(?:    .*\n)*?    resources: (.*)$", text, re.M):
        jobs.append((rule, dict(item.split("=", 1) for item in resources.split(", "))))
    return jobs


def test_site_profile_plus_workflow_profile_routes_gpu_rules(tmp_path: Path) -> None:
    home = tmp_path / "home"
    site = home / ".config" / "snakemake" / "slurm"
    site.mkdir(parents=True)
    (site / "config.yaml").write_text(yaml.safe_dump(SITE_PROFILE))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("XDG_", "SNAKEMAKE_"))}
    env["HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "-d", str(tmp_path / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    assert "Using profiles slurm and workflow specific profile" in text, text[:2000]
    jobs = _jobs_with_resources(text)
    rules = {rule for rule, _ in jobs}
    assert GPU_RULES & rules and rules - GPU_RULES, sorted(rules)
    for rule, resources in jobs:
        assert resources.get("slurm_account") == "mylab", (rule, resources)
        if rule in GPU_RULES:
            # the plugin's partition selection chooses, from the site's partition file
            assert resources.get("gpu") == "1" and resources.get("slurm_partition") == "", (rule, resources)
        else:
            assert "gpu" not in resources and resources.get("slurm_partition") == "standard", (rule, resources)


def test_workflow_profile_covers_every_rule_and_names_no_partition() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--list-rules"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = set(proc.stdout.split()) - {"all", "figures", "download_dataset", "fetch_weights"}  # targets and localrules
    profile = yaml.safe_load(WORKFLOW_PROFILE.read_text())
    resources = profile["set-resources"]
    assert not rules - set(resources), f"add to set-resources in profiles/default: {sorted(rules - set(resources))}"
    assert not set(resources) - rules - {"cache_features_aligned", "train_fullft", "train_forest", "figure_alignment"}
    for rule, values in resources.items():
        assert ("gpu" in values) == (rule in GPU_RULES), (rule, values)
        assert values.get("slurm_partition", "") == "", f"{rule}: the workflow profile must not name a partition"
        assert "attempt" in str(values["runtime"]) and "attempt" in str(values["mem_mb"]), (rule, values)
    assert "default-resources" not in profile, "it would replace the site profile's partition and account"
    groups = profile["groups"]
    assert groups.get("evaluate") == "evaluation", groups
    wanted = {rule for rule in rules if rule.startswith("figure_")} | (SUMMARY_RULES & rules)
    assert not {rule for rule in wanted if groups.get(rule) != "summaries"}, groups


def test_only_the_cluster_profile_retries() -> None:
    """profiles/default applies to local runs as well, where a failure is deterministic: no retries
    there; the SLURM template retries (time-outs and out-of-memory kills get more on the next try)."""
    assert not yaml.safe_load(WORKFLOW_PROFILE.read_text()).get("retries"), "local runs would repeat each failure"
    slurm = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert slurm["retries"] >= 1
