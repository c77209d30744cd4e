"""What a user installs: the version, the license, the extras, the changelog, the CI commands."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import fastapi_once

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_blocks(text: str) -> list[str]:
    """The commands in ```sh blocks, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_version_is_the_installed_distributions() -> None:
    """fastapi_once.__version__ is what the installed metadata says."""
    assert fastapi_once.__version__ == importlib.metadata.version("fastapi-once")


def test_the_metadata_names_the_mit_license_and_each_supported_python() -> None:
    """License-Expression MIT, a LICENSE file, and a classifier for each Python from 3.10."""
    metadata = importlib.metadata.metadata("fastapi-once")
    assert metadata["License-Expression"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    classifiers = metadata.get_all("Classifier") or []
    for minor in range(10, 14):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert metadata["Requires-Python"] == ">=3.10"


def test_only_user_extras_are_published() -> None:
    """The published extras are redis, postgres, mysql, otel and example; test/bench/lint are
    not."""
    metadata = importlib.metadata.metadata("fastapi-once")
    assert sorted(metadata.get_all("Provides-Extra") or []) == [
        "example",
        "mysql",
        "otel",
        "postgres",
        "redis",
    ]


def test_the_changelog_has_this_version_and_the_first() -> None:
    """CHANGELOG.md has a section for the version being made and one for 0.1.0."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (\S+)", changelog, flags=re.M)
    release = fastapi_once.__version__.split(".dev")[0]
    assert headings[0] == release
    assert headings[-1] == "0.1.0"


def test_the_readme_starts_with_a_user_install() -> None:
    """The first command in the README is pip install fastapi-once, before any checkout command."""
    commands = shell_blocks(README)
    assert commands[0] == "pip install fastapi-once"
    assert "pip install 'fastapi-once[redis]'" in commands
    assert "pip install 'fastapi-once[postgres]'" in commands
    assert "pip install 'fastapi-once[otel]'" in commands


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    """The README's test command is one && chain, and .ci/run has it as one line, unchanged."""
    (command,) = [c for c in shell_blocks(README) if c.endswith("python -m pytest")]
    assert command.startswith("python3 -m venv .venv && ")
    assert ";" not in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readmes_group_commands_upgrade_pip_first() -> None:
    """Every command using --group upgrades pip to one that knows it (25.1) earlier in its chain."""
    for command in shell_blocks(README):
        if "--group" in command:
            assert command.index("'pip>=25.1'") < command.index("--group"), command


def test_the_dependency_groups_are_what_the_commands_name() -> None:
    """pyproject.toml has the test, bench and lint groups that the commands install."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.partition("\n[dependency-groups]\n")[2].partition("\n[")[0]
    defined = set(re.findall(r"^(\w+) = \[", section, flags=re.M))
    assert defined == {"test", "bench", "lint"}
    groups = set(re.findall(r"--group (\w+)", README + (ROOT / ".ci" / "run").read_text()))
    assert groups <= defined
