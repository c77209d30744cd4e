"""What a user installs: the version, the license, the extras, the changelog, the CI commands;
that it imports where os has no fork (Windows)."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
    """The published extras are alembic, redis, postgres, otel and example; test/bench/lint are
    not."""
    metadata = importlib.metadata.metadata("fastapi-once")
    assert sorted(metadata.get_all("Provides-Extra") or []) == [
        "alembic",
        "example",
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
    """The README's first commands install what works today (a checkout, a wheel built there),
    then name the package on the index, with its extras; no venv or test command before them."""
    commands = shell_blocks(README)
    assert commands[0] == "pip install ."
    assert commands[1].startswith("pip wheel --no-deps --wheel-dir dist . && pip install dist/")
    assert commands[2] == "pip install fastapi-once"
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
    """pyproject.toml has the test, bench, lint and docs groups that the commands install."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.partition("\n[dependency-groups]\n")[2].partition("\n[")[0]
    defined = set(re.findall(r"^(\w+) = \[", section, flags=re.M))
    assert defined == {"test", "bench", "lint", "docs"}
    groups = set(re.findall(r"--group (\w+)", README + (ROOT / ".ci" / "run").read_text()))
    assert groups <= defined


# Run in a fresh interpreter whose os has neither fork nor register_at_fork, as on Windows
# (the standard library checks for fork before it registers hooks): import the package, make a
# value in a loop and one for the process.
_WITHOUT_FORK_HOOKS = """
import os
del os.fork, os.register_at_fork
import anyio
import fastapi_once, fastapi_once.backends, fastapi_once.testing
from fastapi_once import once

@once
async def pool() -> str:
    return "pool"

@once(scope="process")
def settings() -> str:
    return "settings"

async def main() -> None:
    print(await pool(), await settings())

anyio.run(main)
"""


def test_the_package_imports_and_works_where_os_has_no_fork_hooks() -> None:
    """Without os.register_at_fork (Windows) the import succeeds and onces make their values."""
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FORK_HOOKS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["pool", "settings"]


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text()))


def test_the_project_has_keywords_an_index_search_finds() -> None:
    """Keywords name what the package is for: FastAPI, single-flight, lifespan, the backends."""
    keywords = _pyproject()["project"]["keywords"]
    for word in ("fastapi", "single-flight", "lifespan", "redis", "postgresql", "opentelemetry"):
        assert word in keywords


def test_the_otel_extra_requires_an_api_with_advisory_bucket_boundaries() -> None:
    """opentelemetry-api 1.30 added explicit_bucket_boundaries_advisory; the extra's floor."""
    (requirement,) = _pyproject()["project"]["optional-dependencies"]["otel"]
    assert requirement == "opentelemetry-api>=1.30,<2"
    from opentelemetry.metrics import Meter

    assert (
        "explicit_bucket_boundaries_advisory"
        in inspect.signature(Meter.create_histogram).parameters
    )


def test_security_and_contributing_say_what_a_reporter_and_a_contributor_need() -> None:
    """SECURITY.md: how to report, secrets and key injection; CONTRIBUTING.md: commands, style."""
    security = (ROOT / "SECURITY.md").read_text()
    for topic in (
        "## Reporting a vulnerability",
        "privately",
        "Secrets in output",
        "Key injection",
    ):
        assert topic in security
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    two = [c for c in shell_blocks(README) if c.startswith("python3 -m venv .venv && ")]
    assert len(two) == 2
    assert shell_blocks(contributing)[:2] == two
    for topic in ("python -m bench", "## Style", "## Deprecations", "DeprecationWarning"):
        assert topic in contributing


def test_the_changelog_lists_deprecations_and_removals_in_their_own_groups() -> None:
    """This release's Deprecated group names once_reset's shim; Removed has its own heading."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    this_release = changelog.split("\n## ")[1]
    groups = re.findall(r"^### (\w+)", this_release, flags=re.M)
    assert groups.index("Deprecated") < groups.index("Removed")
    deprecated = this_release.split("### Deprecated")[1].split("###")[0]
    assert "fastapi_once.testing.once_reset" in deprecated
    assert "once_reset" not in this_release.split("### Changed")[1].split("### Deprecated")[0]
