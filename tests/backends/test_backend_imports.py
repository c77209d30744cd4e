"""The backends package imports no driver until a backend is asked for, and says what is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from backend_servers import require

import fastapi_once.backends


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_importing_the_backends_imports_no_driver() -> None:
    """redis and asyncpg are imported only with RedisBackend and PostgresBackend."""
    require("redis")
    require("asyncpg")
    result = run(
        "import sys, fastapi_once.backends as b\n"
        "b.FileLockBackend\n"
        "print(sorted(m for m in ('redis', 'asyncpg') if m in sys.modules))\n"
        "b.RedisBackend, b.PostgresBackend\n"
        "print(sorted(m for m in ('redis', 'asyncpg') if m in sys.modules))\n"
    )
    assert result.stdout.split("\n")[:2] == ["[]", "['asyncpg', 'redis']"], result.stderr


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [("RedisBackend", "redis", "redis"), ("PostgresBackend", "asyncpg", "postgres")],
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
