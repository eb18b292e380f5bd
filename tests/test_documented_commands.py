"""Every snakemake command that README.md and the profiles' comments show works as written.

Commands are found generically (fenced blocks and inline code of the README, comment lines
of profiles/*/config.yaml), placeholders filled, and each is dry-run from a view of the
checkout in a temporary directory, so nothing is downloaded and the repository stays clean.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workflow import REPO

# Harmless shell steps that documented blocks use to write a small config before a command.
SETUP_COMMANDS = {"printf", "sed", "cp", "echo", "cat"}
_SNAKEMAKE = re.compile(r"(?:^|&&\s*|\s)((?:[\w./-]*/)?snakemake(?=\s)[^`\n]*)")


def _blocks_of_readme(text: str) -> list[list[str]]:
    """Shell lines per fenced block, then each inline code span as a block of its own."""
    blocks = [block.splitlines() for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    blocks += [[span] for span in re.findall(r"`([^`\n]+)`", prose)]
    return blocks


def _blocks_of_profiles() -> list[list[str]]:
    blocks = []
    for profile in sorted(REPO.glob("profiles/*/config.yaml")):
        for line in profile.read_text().splitlines():
            if line.lstrip().startswith("#"):
                comment = line.lstrip()[1:]
                blocks += [[span] for span in re.findall(r"`([^`\n]+)`", comment)] or [[comment]]
    return blocks


def documented_blocks() -> list[tuple[str, list[str], str]]:
    """(where, setup lines, snakemake command) for every documented snakemake command."""
    found = []
    sources = [("README.md", _blocks_of_readme((REPO / "README.md").read_text()))]
    sources.append(("profiles/*/config.yaml", _blocks_of_profiles()))
    for where, blocks in sources:
        for block in blocks:
            setup = []
            for line in block:
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                match = _SNAKEMAKE.search(line)
                if match:
                    found.append((where, list(setup), match.group(1).strip()))
                elif line.split(" ", 1)[0] in SETUP_COMMANDS:
                    setup.append(line)
    return found


def _runnable(command: str, workdir: Path) -> list[str]:
    command = re.sub(r"\s\[[^\]]*\]", "", command)  # optional parts shown in brackets (not seeds=[0])
    command = command.replace("<repo>/", "").replace("<workdir>", str(workdir))
    words = shlex.split(command)[1:]
    for flag in ("-d", "--directory"):
        if flag in words:
            words[words.index(flag) + 1] = str(workdir)
    if "-d" not in words and "--directory" not in words:
        words += ["-d", str(workdir)]
    return [sys.executable, "-m", "snakemake", *words, "-n"]


COMMANDS = documented_blocks()


def _tiny_tiff() -> bytes:
    import io

    import numpy as np
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((32, 32), dtype=np.uint8))
    return buffer.getvalue()


_TINY_TIFF = _tiny_tiff()


def test_the_readme_and_the_profiles_document_commands():
    assert len(COMMANDS) >= 8, COMMANDS
    assert any("profiles/slurm" in command for _, _, command in COMMANDS)


@pytest.mark.parametrize("where, setup, command", COMMANDS, ids=[command for _, _, command in COMMANDS])
def test_documented_command_works(where, setup, command, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for entry in REPO.iterdir():  # a view of the checkout: relative paths resolve, files written land here
        if not entry.name.startswith(".") and entry.name != "tests":
            (checkout / entry.name).symlink_to(entry)
    env = dict(os.environ)
    profile = re.search(r"--profile\s+(\S+)", command)
    if profile and not (checkout / profile.group(1).replace("<repo>/", "")).exists():
        if profile.group(1) != "slurm":
            pytest.skip(f"{where}: {command!r} uses a site profile {profile.group(1)!r} that is not in the repository")
        # A cluster user's own site profile, installed from the template as README says.
        env["HOME"] = str(tmp_path / "home")
        shutil.copytree(REPO / "profiles" / "slurm", tmp_path / "home" / ".config" / "snakemake" / "slurm")
    for line in setup:
        subprocess.run(line, shell=True, cwd=checkout, check=True)
    words = _runnable(command, tmp_path / "work")
    images = re.search(r"predict=\{images: ([\w.-]+)", command)
    if images:  # the user's own images (relative to -d), which predict reads as its inputs
        folder = tmp_path / "work" / images.group(1)
        folder.mkdir(parents=True)
        (folder / "slice.tif").write_bytes(_TINY_TIFF)
    result = subprocess.run(words, cwd=checkout, capture_output=True, text=True, timeout=600, env=env)
    text = result.stdout + result.stderr
    assert result.returncode == 0, f"{where}: {command}\n{' '.join(words)}\n{text[-3000:]}"
    assert "This was a dry-run" in text or "Nothing to be done" in text, text[-2000:]
    if "--until" in words:
        jobs = set(re.findall(r"^rule (\w+):", text, flags=re.M))
        assert jobs and jobs <= {"download_dataset", "fetch_weights"}, jobs


@pytest.mark.parametrize("where, setup, command", COMMANDS, ids=[command for _, _, command in COMMANDS])
def test_nothing_but_config_files_follows_configfile(where, setup, command):
    """--configfile takes every following word as a file: a target written after it is swallowed."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    if "--configfile" not in words:
        return
    after = words[words.index("--configfile") + 1 :]
    files = after[: next((i for i, word in enumerate(after) if word.startswith("-") and word != "..."), len(after))]
    assert files and all(re.fullmatch(r"\S+\.ya?ml|FILE|\.\.\.", word) for word in files), (
        f"{where}: {command!r}: {files} after --configfile would all be read as config files"
    )
