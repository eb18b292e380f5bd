"""The conda environment every rule uses: valid YAML, and nothing of pyproject.toml missing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / "envs" / "workflow.yaml"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _environment() -> tuple[dict, set[str]]:
    env = yaml.safe_load(ENV.read_text())
    names: set[str] = set()
    for dependency in env["dependencies"]:
        if isinstance(dependency, dict):
            names |= {_name(item) for item in dependency["pip"] if not item.startswith("-")}
        else:
            names.add(_name(dependency))
    return env, names


def test_environment_file_is_valid_conda_yaml() -> None:
    env, names = _environment()
    assert set(env) == {"channels", "dependencies"} and env["channels"][0] == "conda-forge"
    assert "python" in names and "pip" in names
    pip = [item for item in env["dependencies"] if isinstance(item, dict)]
    assert len(pip) == 1 and "-e .." in pip[0]["pip"], "the environment installs this repository's package"


def test_every_pyproject_dependency_is_in_the_environment() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    _, names = _environment()
    missing = sorted(_name(requirement) for requirement in project["dependencies"] if _name(requirement) not in names)
    assert not missing, f"envs/workflow.yaml lacks {missing} (listed in pyproject.toml)"


def test_every_rule_uses_the_one_environment() -> None:
    rules = (REPO / "rules").glob("*.smk")
    used = {match for path in rules for match in re.findall(r'conda:\s*\n\s*"([^"]+)"', path.read_text())}
    assert used == {"../envs/workflow.yaml"}, used
    assert [path.name for path in (REPO / "envs").iterdir()] == ["workflow.yaml"]
