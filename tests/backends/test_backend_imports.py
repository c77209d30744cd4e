"""The backends package imports no driver until a backend is asked for, and says what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from backend_servers import require

import fastapi_once.backends


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_importing_the_backends_imports_no_driver() -> None:
    """redis, asyncpg and asyncmy are imported only with their backends."""
    require("redis")
    require("asyncpg")
    require("asyncmy")
    drivers = "('redis', 'asyncpg', 'asyncmy')"
    result = run(
        "import sys, fastapi_once.backends as b\n"
        "b.FileLockBackend\n"
        f"print(sorted(m for m in {drivers} if m in sys.modules))\n"
        "b.RedisBackend, b.PostgresBackend, b.MySQLBackend\n"
        f"print(sorted(m for m in {drivers} if m in sys.modules))\n"
    )
    assert result.stdout.split("\n")[:2] == ["[]", "['asyncmy', 'asyncpg', 'redis']"], result.stderr


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [
        ("RedisBackend", "redis", "redis"),
        ("PostgresBackend", "asyncpg", "postgres"),
        ("MySQLBackend", "asyncmy", "mysql"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(backend: str, module: str, extra: str) -> None:
    """Without its driver, a backend's ImportError says which extra brings it."""
    result = run(
        f"import sys; sys.modules[{module!r}] = None\nfrom fastapi_once.backends import {backend}\n"
    )
    assert "ImportError" in result.stderr
    assert f"pip install 'fastapi-once[{extra}]'" in result.stderr


def test_the_exported_names() -> None:
    """The curated, sorted __all__, each name resolving."""
    names = fastapi_once.backends.__all__
    assert names == sorted(names)
    assert names == [
        "Backend",
        "BackendError",
        "FileLockBackend",
        "LeaseLostError",
        "MySQLBackend",
        "OnceCoolingDownError",
        "PostgresBackend",
        "RedisBackend",
        "WaitTimeoutError",
        "backend_from_url",
        "fencing_token",
    ]
    for name in names:
        assert getattr(fastapi_once.backends, name) is not None
    with pytest.raises(AttributeError, match="NoSuchBackend"):
        fastapi_once.backends.NoSuchBackend  # type: ignore[attr-defined]  # noqa: B018


def run_tests_without_drivers(ci: bool) -> subprocess.CompletedProcess[str]:
    """Run the file, Redis, PostgreSQL and MySQL tests as if their drivers were not installed."""
    here = Path(__file__).parent
    without = "redis,asyncpg,asyncmy"
    env = {**os.environ, "FASTAPI_ONCE_TEST_WITHOUT": without, "CI": str(ci).lower()}
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--no-cov"),
            *("-n", "0"),  # in this process: a few dozen quick tests need no xdist workers
            # None of these files uses Hypothesis: its plugin would import (and, as an installed
            # plugin's package, assertion-rewrite) all of it for nothing.
            *("-p", "no:hypothesispytest"),
            str(here / "test_file_backend.py"),
            str(here / "test_redis_backend.py"),
            str(here / "test_postgres_backend.py"),
            str(here / "test_mysql_store.py"),
            *("-k", "not another_user"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=here.parent.parent,
        check=False,
        timeout=100,
    )


@pytest.mark.timeout(120)
def test_without_the_drivers_the_file_tests_run_and_the_others_skip_saying_what_to_install() -> (
    None
):
    """A missing driver skips its backend's tests with the pip command; the rest still run."""
    result = run_tests_without_drivers(ci=False)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout
    assert "redis.asyncio is not installed: pip install 'fastapi-once[redis,postgres,mysql]'" in (
        result.stdout
    )
    assert "asyncpg is not installed" in result.stdout
    assert "asyncmy is not installed" in result.stdout


@pytest.mark.timeout(120)
def test_under_ci_a_missing_driver_fails_the_run() -> None:
    """With CI=true the same run fails, saying that every backend test must run."""
    result = run_tests_without_drivers(ci=True)
    assert result.returncode != 0
    assert "CI=true requires every backend test to run" in result.stdout
