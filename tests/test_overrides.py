"""Command-line overrides change one key of the preset in force, in the user's words (dry-runs only)."""

from __future__ import annotations

import subprocess

from tests.workflow import REPO, SNAKEMAKE, demo_runs_per_model, scheduled_jobs, snakemake, write_config

ONE_SEED = demo_runs_per_model(n_seeds=1)  # per backbone × regime: training sets and their label-efficiency sizes


def test_demo_profile_with_one_seed_keeps_the_demo(tmp_path):
    result = snakemake(tmp_path, "-n", "--config", "seeds=[0]")
    jobs = scheduled_jobs(result)
    # demo: filterbank (head) and tinyvit (head, lora) on three training sets, one seed
    assert jobs["train_head"] == 2 * ONE_SEED and jobs["train_lora"] == ONE_SEED, jobs
    assert jobs["prepare_dataset"] == 2 and "download_dataset" not in jobs, "the published config replaced the demo"


def test_nested_override_changes_one_key_and_keeps_its_block(tmp_path):
    result = snakemake(
        tmp_path, "-n", "-p", "--config", "seeds=[0]", "training={max_epochs: 3}", "backbones={tinyvit: {layers: [-1]}}"
    )
    assert scheduled_jobs(result)["train_head"] == 2 * ONE_SEED


def test_a_wrong_value_on_the_command_line_blames_the_command_line(tmp_path):
    result = snakemake(tmp_path, "-n", "--config", "seeds=[zero]", check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the command line (--config): seeds.0 is 'zero', which is not of type integer" in text, text[-2000:]
    assert "workflow_config.yaml:" not in text


def test_a_configfile_without_required_blocks_says_how_to_layer(tmp_path):
    partial = write_config(tmp_path / "mine.yaml", {"seeds": [0]})
    result = snakemake(tmp_path, "-n", configfile=partial, check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the required block(s) datasets, training_sets, backbones are missing" in text, text[-2000:]
    assert "A --configfile replaces the preset whole" in text and "later files override earlier ones" in text


def test_layered_configfiles_keep_the_preset_and_change_one_key(tmp_path):
    partial = write_config(tmp_path / "mine.yaml", {"seeds": [0]})
    command = SNAKEMAKE + [
        "-d",
        str(tmp_path),
        "--profile",
        str(REPO / "profiles/demo"),
        "-n",
        "--configfile",
        str(REPO / "profiles/demo/workflow_config.yaml"),
        str(partial),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert scheduled_jobs(result)["train_head"] == 2 * ONE_SEED
