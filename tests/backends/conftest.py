"""Fixtures of the backend tests: the real servers, backend specs, worker processes, timings.

The servers (redis-server, PostgreSQL) are started by the suite itself on free ports; see
backend_servers.py. Tests parametrised by ``kind`` run on every backend, and under trio too
where the backend supports it (the file backend).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_servers import (
    MariaDBServer,
    PostgresServer,
    RedisServer,
    Worker,
    start_mariadb,
    start_postgres,
    start_redis,
)
from backend_worker import build_backend
from spawner import Spawner

from fastapi_once.backends import Backend

# FASTAPI_ONCE_TEST_WITHOUT=redis,asyncpg runs the suite as if those drivers were not installed
# (test_backend_imports.py checks that the tests then skip, or fail under CI=true).
for _driver in filter(None, os.environ.get("FASTAPI_ONCE_TEST_WITHOUT", "").split(",")):
    sys.modules[_driver] = None  # type: ignore[assignment]

KINDS = ["file", "redis", "postgres", "postgres-xact"]
# Only the file backend runs on trio; redis.asyncio and asyncpg are asyncio-only.
KINDS_AND_LOOPS = [
    ("file", "asyncio"),
    ("file", "trio"),
    ("redis", "asyncio"),
    ("postgres", "asyncio"),
    ("postgres-xact", "asyncio"),
    ("mysql", "asyncio"),  # only where a test names it: @pytest.mark.kinds("mysql")
]


@pytest.hookimpl(tryfirst=True)  # before the fixtures' own params (anyio_backend's) apply
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``kind`` over the backends, and ``anyio_backend`` over the loops each runs on."""
    if "kind" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("kinds")
    wanted = marker.args if marker else KINDS
    if "anyio_backend" in metafunc.fixturenames:
        pairs = [p for p in KINDS_AND_LOOPS if p[0] in wanted]
        metafunc.parametrize(("kind", "anyio_backend"), pairs, ids=[f"{k}-{b}" for k, b in pairs])
    else:
        metafunc.parametrize("kind", wanted)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kinds(*kinds): run only on these backend kinds")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session (tests keep apart by namespace)."""
    server = start_redis()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may kill and restart."""
    server = start_redis()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (tests keep apart by marker table)."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, which the test may stop and restart."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """One MariaDB server for the session (tests keep apart by table)."""
    server = start_mariadb()
    yield server
    server.stop()


# --- backends -------------------------------------------------------------------------------------


@pytest.fixture
def spec(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """How to build the ``kind`` backend, apart from every other test's (JSON, for workers)."""
    unique = "t" + secrets.token_hex(6)
    if kind == "file":
        return {"kind": kind, "directory": str(tmp_path / "locks")}
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return {"kind": kind, "url": server.url, "namespace": unique, "lease": 1.0}
    if kind == "mysql":
        my: MariaDBServer = request.getfixturevalue("mariadb_server")
        return {"kind": kind, "url": my.url, "table": unique}
    pg: PostgresServer = request.getfixturevalue("postgres_server")
    lock = "transaction" if kind == "postgres-xact" else "session"
    return {"kind": kind, "dsn": pg.dsn, "table": unique, "lock": lock}


# --- worker processes -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def spawner() -> Iterator[Spawner]:
    """The process that forks the worker processes, already imported (see spawner.py)."""
    directory = Path(tempfile.mkdtemp(prefix="fastapi-once-spawner-"))
    made = Spawner(directory)
    yield made
    made.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_workers(spawner: Spawner) -> Iterator[Callable[..., list[Worker]]]:
    """Start worker processes; each is ready (imported, backend built) when this returns."""
    started: list[Worker] = []

    def start(n: int, config: dict[str, Any]) -> list[Worker]:
        workers = [Worker(spawner.spawn("backend_worker", json.dumps(config))) for _ in range(n)]
        started.extend(workers)
        for worker in workers:
            worker.wait_ready()
        return workers

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.communicate()


# --- measured figures, printed at the end -------------------------------------------------------

_figures: list[str] = []


@pytest.fixture
def record_figure() -> Callable[[str], None]:
    """Record a measured figure (latency, takeover time) for the end-of-run summary."""
    return _figures.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _figures:
        terminalreporter.section("backend timings")
        for line in _figures:
            terminalreporter.write_line(line)


@pytest.fixture
async def make(spec: dict[str, Any]) -> AsyncIterator[Callable[..., Backend]]:
    """Build backends of the test's kind (each a process's view of the store); they are
    closed on the test's event loop."""
    made: list[Backend] = []

    def make(**options: Any) -> Backend:
        backend = build_backend(spec, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()
