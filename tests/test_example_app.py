"""The example app: its routes, a cold burst in-process, mounting, the once-per-deployment
migration across processes and backends, and ``python -m example_app``."""

from __future__ import annotations

import asyncio
import asyncio.base_events
import importlib
import io
import json
import os
import runpy
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import example_app
from example_app import burst, client, deployment, preflight
from fastapi_once import once_lifespan, reset_all
from fastapi_once.backends import FileLockBackend

ROOT = Path(__file__).resolve().parent.parent

#: The variables that configure the example; tests start without them.
EXAMPLE_VARIABLES = ("EXAMPLE_DB", "EXAMPLE_BACKEND_URL")


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Zero the example's counters; use a database of the test's own and the file backend
    beside it unless a test sets others."""
    for name in EXAMPLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXAMPLE_DB", str(tmp_path / "example.db"))
    example_app.reset_stats()
    yield
    example_app.reset_stats()


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and yield a client that talks to it in-process."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@asynccontextmanager
async def without_lifespan(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Yield a client to ``app`` with no lifespan; clean up what the requests made afterwards."""
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
    finally:
        await reset_all()


def is_closed(connection: sqlite3.Connection) -> bool:
    try:
        connection.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


# --- routes ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_startup_makes_the_schema_before_any_request() -> None:
    """The app's lifespan opens the database and creates the tables before it serves."""
    async with serving(example_app.app) as client:
        assert dict(example_app.setups) == {"database": 1, "schema": 1}
        assert (await client.get("/stats")).json() == {
            "setups": {"database": 1, "schema": 1},
            "fetches": {},
        }


@pytest.mark.anyio
async def test_notes_are_stored_and_listed() -> None:
    """POST /notes stores a note in SQLite and GET /notes lists it."""
    async with serving(example_app.app) as client:
        added = await client.post("/notes", json={"text": "buy milk"})
        assert added.status_code == 201
        assert added.json() == {"id": 1, "text": "buy milk"}
        assert (await client.get("/notes")).json() == [{"id": 1, "text": "buy milk"}]


@pytest.mark.anyio
async def test_database_file_comes_from_example_db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With EXAMPLE_DB set, notes land in that file and outlive the app."""
    path = tmp_path / "notes.db"
    monkeypatch.setenv("EXAMPLE_DB", str(path))
    async with serving(example_app.app) as client:
        assert (await client.post("/notes", json={"text": "kept"})).status_code == 201
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT text FROM notes").fetchall() == [("kept",)]
    connection.close()


@pytest.mark.anyio
async def test_predict_loads_the_model_once_and_scores_text() -> None:
    """Two requests to /predict share one model load and one model id."""
    async with serving(example_app.app) as client:
        good = (await client.get("/predict", params={"text": "good great"})).json()
        bad = (await client.get("/predict", params={"text": "awful"})).json()
    assert good["score"] > 0 > bad["score"]
    assert good["model"] == bad["model"]
    assert example_app.setups["sentiment_model"] == 1


@pytest.mark.anyio
async def test_stuff_fetches_each_url_once() -> None:
    """/stuff fetches a URL from the upstream once; the same URL again gets the same answer."""
    async with serving(example_app.app) as client:
        first = (await client.get("/stuff", params={"url": "/items/7"})).json()
        again = (await client.get("/stuff", params={"url": "/items/7"})).json()
        other = (await client.get("/stuff", params={"url": "/items/8"})).json()
    assert first == again
    assert first["data"] == {"id": 7, "name": "item 7", "price_cents": 799}
    assert other["data"]["id"] == 8
    assert dict(example_app.fetches) == {"/items/7": 1, "/items/8": 1}
    assert example_app.setups["http_client"] == 1


@pytest.mark.anyio
async def test_stuff_does_not_keep_a_failed_fetch() -> None:
    """An upstream 404 reaches the client as a 404, and the next request fetches again."""
    async with serving(example_app.app) as client:
        for _ in range(2):
            response = await client.get("/stuff", params={"url": "/items/0"})
            assert response.status_code == 404
            assert "nothing at /items/0" in response.json()["detail"]
    assert example_app.fetches["/items/0"] == 2


@pytest.mark.anyio
async def test_stuff_rejects_a_url_that_is_not_an_upstream_path() -> None:
    """/stuff only takes paths on the upstream (starting with /), never a full URL."""
    async with serving(example_app.app) as client:
        response = await client.get("/stuff", params={"url": "http://example.com/"})
    assert response.status_code == 422
    assert not example_app.fetches


@pytest.mark.anyio
async def test_shutdown_closes_the_database_and_the_http_client() -> None:
    """The lifespan's shutdown runs the code after each generator's yield."""
    async with serving(example_app.app) as client:
        assert (await client.get("/stuff", params={"url": "/items/1"})).status_code == 200
        connection = await example_app.database()
        http = await example_app.http_client()
        assert not is_closed(connection)
        assert not http.is_closed
    assert is_closed(connection)
    assert http.is_closed


@pytest.mark.anyio
async def test_each_lifespan_starts_afresh() -> None:
    """A second lifespan opens a new database: the first one's shutdown forgot its values."""
    async with serving(example_app.app):
        first = await example_app.database()
    async with serving(example_app.app):
        second = await example_app.database()
    assert second is not first
    assert example_app.setups["database"] == 2


@pytest.mark.anyio
async def test_ready_answers_200_after_startup() -> None:
    """GET /ready, the readiness probe over the startup onces, says ready once the app serves."""
    async with serving(example_app.app) as client:
        response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


@pytest.mark.anyio
async def test_worker_says_which_process_answered() -> None:
    """GET /worker gives the answering process's pid along with its stats."""
    async with serving(example_app.app) as client:
        body = (await client.get("/worker")).json()
    assert body == {
        "pid": os.getpid(),
        "setups": {"database": 1, "schema": 1},
        "fetches": {},
        "ready_at": {},
        "fetched_at": {},
    }


@pytest.mark.anyio
async def test_responses_say_which_worker_and_when_it_received_them() -> None:
    """Each response names its process and receipt time; /worker says when setups were ready."""
    async with serving(example_app.app) as client:
        before = time.time()
        response = await client.get("/predict", params={"text": "good"})
        worker = (await client.get("/worker")).json()
        await client.get("/stuff", params={"url": "/items/2"})
        fetched = (await client.get("/worker")).json()["fetched_at"]
    assert response.headers["x-worker"] == str(os.getpid())
    received = float(response.headers["x-received-at"])
    assert before <= received <= worker["ready_at"]["sentiment_model"]
    assert set(fetched) == {"/items/2"}


# --- the once-per-deployment migration ------------------------------------------------------------


@pytest.mark.anyio
async def test_migrations_lists_the_one_run_after_startup() -> None:
    """GET /migrations shows the head revision and the one logged run of the upgrade, by this
    process, which applied both revisions of the example's migrations."""
    async with serving(example_app.app) as client:
        body = (await client.get("/migrations")).json()
    assert body["heads"] == ["0002"]
    assert [(run["pid"], run["head"]) for run in body["runs"]] == [(os.getpid(), "0002")]
    assert (await anyio.to_thread.run_sync(applied_revisions)) == ["0002"]


def applied_revisions() -> list[str]:
    """The revisions in the version table of the database ``$EXAMPLE_DB``."""
    with sqlite3.connect(os.environ["EXAMPLE_DB"]) as connection:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    return [row[0] for row in rows]


@pytest.mark.anyio
async def test_without_example_db_the_database_is_a_file_of_the_process_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without $EXAMPLE_DB the app migrates and uses one scratch file, the same all along."""
    monkeypatch.delenv("EXAMPLE_DB")
    path = example_app.service.database_path()
    assert path == example_app.service.database_path()
    async with serving(example_app.app) as client:
        assert (await client.post("/notes", json={"text": "scratch"})).status_code == 201
        assert example_app.service.database_file(await example_app.database()) == path


@pytest.mark.anyio
async def test_a_restart_on_the_same_database_does_not_migrate_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migration's marker outlives the app: a second start on one database file skips it."""
    monkeypatch.setenv("EXAMPLE_DB", str(tmp_path / "kept.db"))
    for _ in range(2):  # the marker is in the lock directory beside the database
        async with serving(example_app.app) as client:
            runs = (await client.get("/migrations")).json()["runs"]
            assert len(runs) == 1
    assert dict(example_app.setups) == {"database": 2, "schema": 1}
    assert (tmp_path / deployment.LOCK_DIR_NAME).is_dir()


@pytest.mark.anyio
async def test_resetting_the_migration_runs_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """schema.reset() clears the backend's marker too, so the next request runs the upgrade once
    more (finding the database at the heads already, it applies nothing)."""
    monkeypatch.setenv("EXAMPLE_DB", str(tmp_path / "app.db"))
    async with serving(example_app.app) as client:
        await example_app.schema.reset()
        runs = (await client.get("/migrations")).json()["runs"]
    assert len(runs) == 2
    assert example_app.setups["schema"] == 2


MIGRATE = """
import json

import anyio

import example_app
from fastapi_once import reset_all


async def main() -> None:
    try:
        print(json.dumps(await example_app.schema()))
    finally:
        await reset_all()


anyio.run(main)
"""


def test_the_migration_runs_once_across_processes_with_the_file_backend(tmp_path: Path) -> None:
    """Four processes migrating one database file at once: one runs it, all get its result."""
    path = tmp_path / "shared.db"
    env = {**os.environ, "EXAMPLE_DB": str(path), "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=30) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, outputs
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT pid FROM migrations_log").fetchall()
    connection.close()
    assert len(rows) == 1
    assert rows[0][0] in {process.pid for process in processes}
    assert results == [["0002"]] * 4


# --- choosing the backend -------------------------------------------------------------------------


def test_the_default_backend_is_a_file_lock_next_to_the_database(tmp_path: Path) -> None:
    """Without EXAMPLE_BACKEND_URL the migration locks files in fastapi_once-locks beside the
    db; without EXAMPLE_DB either, in a private directory of its own."""
    backend = deployment.backend({"EXAMPLE_DB": str(tmp_path / "app.db")})
    assert isinstance(backend, FileLockBackend)
    assert backend.directory == str(tmp_path / "fastapi_once-locks")
    one, two = deployment.backend({}), deployment.backend({})
    assert isinstance(one, FileLockBackend)
    assert isinstance(two, FileLockBackend)
    assert one.directory != two.directory


def test_a_file_url_chooses_the_lock_directory(tmp_path: Path) -> None:
    """EXAMPLE_BACKEND_URL=file:///dir puts the lock files there."""
    environ = {
        "EXAMPLE_DB": str(tmp_path / "app.db"),
        "EXAMPLE_BACKEND_URL": f"file://{tmp_path}/l",
    }
    backend = deployment.backend(environ)
    assert isinstance(backend, FileLockBackend)
    assert backend.directory == str(tmp_path / "l")


def test_a_redis_url_gives_a_redis_backend_scoped_to_the_database() -> None:
    """EXAMPLE_BACKEND_URL=redis://... gives a RedisBackend, its password masked, its namespace
    that of the database file."""
    backend_servers().require("redis")
    from fastapi_once.backends import RedisBackend

    url = "redis://:s3cret@127.0.0.1:6390/2"
    first = deployment.backend({"EXAMPLE_BACKEND_URL": url, "EXAMPLE_DB": "/srv/a/app.db"})
    again = deployment.backend({"EXAMPLE_BACKEND_URL": url, "EXAMPLE_DB": "/srv/b/../a/app.db"})
    other = deployment.backend({"EXAMPLE_BACKEND_URL": url, "EXAMPLE_DB": "/srv/b/app.db"})
    assert isinstance(first, RedisBackend)
    assert isinstance(again, RedisBackend)
    assert isinstance(other, RedisBackend)
    assert "127.0.0.1:6390/2" in first.describe()
    assert "s3cret" not in first.describe()
    assert first.namespace == again.namespace != other.namespace


def test_a_postgres_url_gives_a_postgres_backend_with_a_table_of_the_database() -> None:
    """EXAMPLE_BACKEND_URL=postgresql://... gives a PostgresBackend."""
    backend_servers().require("asyncpg")
    from fastapi_once.backends import PostgresBackend

    environ = {"EXAMPLE_BACKEND_URL": "postgres://app:s3cret@127.0.0.1:5433/app"}
    backend = deployment.backend(environ)
    assert isinstance(backend, PostgresBackend)
    assert "127.0.0.1:5433/app" in backend.describe()
    assert "s3cret" not in backend.describe()
    assert backend.table.startswith("example_app_")


def test_an_unknown_backend_url_is_refused() -> None:
    """EXAMPLE_BACKEND_URL=memcached://... raises a ValueError that lists the URLs there are."""
    with pytest.raises(ValueError, match="unknown scheme; give file:///path"):
        deployment.backend({"EXAMPLE_BACKEND_URL": "memcached://cache:11211"})


def test_importing_the_example_imports_no_backend_driver() -> None:
    """Even with a Redis URL, importing the app imports neither redis nor asyncpg."""
    code = "import sys, example_app; print([m for m in ('redis', 'asyncpg') if m in sys.modules])"
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "EXAMPLE_BACKEND_URL": "redis://cache", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert completed.stdout.strip() == "[]"


# --- a cold burst ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cold_burst_runs_each_setup_once() -> None:
    """300 concurrent first requests make the model, the client and each URL's fetch once."""
    paths = burst.paths(300)
    bodies: dict[str, set[str]] = {}

    async def get(client: httpx.AsyncClient, path: str) -> None:
        response = await client.get(path)
        assert response.status_code == 200, response.text
        bodies.setdefault(path, set()).add(response.text)

    async with serving(example_app.app) as client:
        async with anyio.create_task_group() as group:
            for path in paths:
                group.start_soon(get, client, path)
        stats = (await client.get("/stats")).json()
    assert stats == burst.expected_stats(paths)
    assert stats["setups"] == dict.fromkeys(
        ["database", "schema", "sentiment_model", "http_client"], 1
    )
    assert {path: len(texts) for path, texts in bodies.items()} == dict.fromkeys(bodies, 1)


# --- mounted under a host app ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_mounted_app_makes_its_onces_on_first_use() -> None:
    """Under a host without once_lifespan, the first request makes the database and schema."""
    host = FastAPI()
    host.mount("/example", example_app.app)
    async with without_lifespan(host) as client:
        assert not example_app.setups
        response = await client.post("/example/notes", json={"text": "lazy"})
        assert response.status_code == 201
        assert (await client.get("/example/notes")).json() == [{"id": 1, "text": "lazy"}]
        assert (await client.get("/example/predict", params={"text": "good"})).status_code == 200
        connection = await example_app.database()
        assert dict(example_app.setups) == {"database": 1, "schema": 1, "sentiment_model": 1}
    assert is_closed(connection)


@pytest.mark.anyio
async def test_mounted_app_is_warmed_and_cleaned_up_by_the_host() -> None:
    """The host's once_lifespan makes the example's startup onces and closes them at shutdown."""
    host = FastAPI(lifespan=once_lifespan(*example_app.STARTUP))
    host.mount("/example", example_app.app)
    async with serving(host) as client:
        assert dict(example_app.setups) == {"database": 1, "schema": 1}
        connection = await example_app.database()
        assert (await client.post("/example/notes", json={"text": "warm"})).status_code == 201
        stuff = await client.get("/example/stuff", params={"url": "/items/3"})
        assert stuff.json()["data"]["id"] == 3
        http = await example_app.http_client()
        assert dict(example_app.setups) == {"database": 1, "schema": 1, "http_client": 1}
    assert is_closed(connection)
    assert http.is_closed


# --- python -m example_app ------------------------------------------------------------------------


def worker_stats(sent: list[str], *, migrated: bool) -> burst.Stats:
    """One worker's /stats after serving ``sent``: each setup once; the migration if it ran it."""
    stats = burst.expected_stats(sent)
    if not migrated:
        del stats["setups"]["schema"]
    return stats


def healthy_result(sent: list[str], workers: int = 2) -> burst.Result:
    """A burst's Result in which all went well: worker 100 migrated, each setup ran once in each."""
    result = burst.Result("http://127.0.0.1:1", sent, workers, latencies=[0.1, 0.2])
    for path in sent:
        result.bodies[path].add("same")
    result.processes = {100 + i: worker_stats(sent, migrated=i == 0) for i in range(workers)}
    result.migrations = [{"pid": 100, "at": 0.0, "head": "0002"}]
    return result


def test_burst_result_fails_when_a_setup_ran_twice() -> None:
    """The report's verdict is FAILED when a worker's /stats shows a setup that ran twice."""
    result = healthy_result(burst.paths(4))
    assert result.ok
    result.processes[101]["setups"]["sentiment_model"] = 2
    assert not result.ok
    text = burst.report(result)
    assert "pid 101 ran sentiment_model 2 times" in text
    assert text.splitlines()[-1].startswith("FAILED")


def test_burst_result_fails_when_a_request_failed_or_values_differ() -> None:
    """Any failed request, or two different answers for one path from one worker, fail it."""
    sent = burst.paths(2)
    result = healthy_result(sent, workers=1)
    assert result.ok
    result.bodies[sent[0]].add("different")
    assert not result.ok
    result.bodies[sent[0]].discard("different")
    result.errors.append("GET /predict: 500")
    assert not result.ok


def test_burst_result_allows_one_value_per_path_in_each_worker() -> None:
    """Two workers may answer a path with two values (each its own model), never with three."""
    sent = burst.paths(2)
    result = healthy_result(sent, workers=2)
    result.bodies[sent[0]].add("the other worker's")
    assert result.ok
    result.bodies[sent[0]].add("a third")
    assert "3 different responses to /predict?text=a+good+day from 2 workers" in result.problems


def test_burst_result_fails_when_the_migration_ran_twice() -> None:
    """Two runs in the migration log (one in each worker) make the verdict FAILED."""
    result = healthy_result(burst.paths(4))
    result.migrations.append({"pid": 101, "at": 1.0, "head": "0002"})
    result.processes[101]["setups"]["schema"] = 1
    assert result.stats["setups"]["schema"] == 2
    assert "the migration ran 2 times in total" in result.problems
    assert burst.report(result).splitlines()[-1].startswith("FAILED")


def test_burst_result_fails_when_the_log_and_the_workers_disagree() -> None:
    """A migration that the workers counted but the shared database did not log fails it."""
    result = healthy_result(burst.paths(4))
    result.migrations.clear()
    assert result.problems[:2] == [
        "the migration ran 0 times in total",
        "the workers' counts of the migration add up to 1, its log to 0",
    ]


def test_burst_result_fails_when_a_worker_did_not_answer() -> None:
    """A worker whose stats were never collected (so unchecked) makes the verdict FAILED."""
    result = healthy_result(burst.paths(4), workers=3)
    del result.processes[102]
    assert result.problems == ["2 of 3 workers answered GET /worker"]


def test_percentile_is_nearest_rank() -> None:
    """p50 of 1..100 is 50, p99 is 99, p100 is the maximum, and p0 the minimum."""
    values = [float(v) for v in range(1, 101)]
    assert [burst.percentile(values, p) for p in (0, 50, 99, 100)] == [1, 50, 99, 100]


@pytest.fixture(scope="module")
def default_run() -> subprocess.CompletedProcess[str]:
    """One ``python -m example_app --requests 300`` run, as the README runs it (its default: two
    uvicorn workers on the file backend), that the two tests below each read."""
    return subprocess.run(
        [sys.executable, "-m", "example_app", "--requests", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def test_python_m_example_app_reports_one_setup_each_and_exits_0(
    default_run: subprocess.CompletedProcess[str],
) -> None:
    """The main job runs uvicorn, bursts 300 cold requests, reports each setup ran once, and says
    each phase on stderr as it goes."""
    completed = default_run
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("300 concurrent cold requests to uvicorn at http://127.0.0.1:")
    assert "database=1 schema=1" in lines[1]
    assert "sentiment_model=1" in lines[1]
    assert "http_client=1" in lines[1]
    assert "/items/1=1 /items/2=1 /items/3=1 /items/4=1 /items/5=1" in lines[2]
    assert "300 ok, 0 errors" in lines[3]
    assert lines[4].startswith("  latency   min ")
    assert any(line.startswith("    waiting for the setup  p50 ") for line in lines)
    (waited,) = [line for line in lines if line.startswith("  waited    ")]
    (warm,) = [line for line in lines if line.startswith("  warm      ")]
    counts = [int(line.split()[1]) for line in (waited, warm)]
    assert sum(counts) == 300
    assert lines[-1].startswith("OK")
    phases = [line.partition("] ")[2] for line in completed.stderr.splitlines()]
    assert phases[0] == "starting 2 uvicorn workers"
    assert any(phase.startswith("burst sent: 300 requests") for phase in phases)
    assert any(phase.startswith("300/300 answered") for phase in phases)
    assert "Traceback" not in completed.stderr


def run_example(*args: str, env: Mapping[str, str] | None = None) -> str:
    """Run ``python -m example_app *args``; return its output (the progress on stderr, then the
    report on stdout), after checking it exited 0."""
    completed = subprocess.run(
        [sys.executable, "-m", "example_app", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    output = completed.stderr + completed.stdout
    assert completed.returncode == 0, output
    return output


def assert_migrated_once(output: str, workers: int) -> None:
    """The report says the migration ran once in total and each worker set up once."""
    lines = output.splitlines()
    assert any(line.startswith("  migration ran 1 time in total, in pid ") for line in lines)
    per_worker = [line for line in lines if line.startswith("  pid ")]
    assert len(per_worker) == workers, output
    assert all("database=1" in line and "=2" not in line for line in per_worker), output
    assert sum("schema=1" in line for line in per_worker) == 1, output
    assert lines[-1].startswith(f"OK: the migration ran once in total; in each of the {workers}")


def test_python_m_example_app_with_two_workers_migrates_once_in_total(
    default_run: subprocess.CompletedProcess[str],
) -> None:
    """Two uvicorn workers (the default) on the file backend: one migration in all, one setup
    each per worker."""
    output = default_run.stderr + default_run.stdout
    assert default_run.returncode == 0, output
    assert "300 concurrent cold requests to uvicorn at http://127.0.0.1:" in output
    assert "(2 workers)" in output
    assert_migrated_once(output, workers=2)


def backend_servers() -> Any:
    """tests/backends/backend_servers.py, which starts the backend tests' own servers."""
    directory = str(ROOT / "tests" / "backends")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return importlib.import_module("backend_servers")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The URL (with its password) of a redis-server of this module's own."""
    server = backend_servers().start_redis()
    yield server.url
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    """The DSN (with its password) of a PostgreSQL server of this module's own."""
    server = backend_servers().start_postgres()
    yield server.dsn
    server.stop()


@pytest.fixture(scope="module")
def mysql_url() -> Iterator[str]:
    """The URL (with its password) of a MariaDB server of this module's own."""
    server = backend_servers().start_mariadb()
    yield server.url
    server.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["redis", "postgres", "mysql"])
def test_python_m_example_app_migrates_once_across_a_server_backend(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """With EXAMPLE_BACKEND_URL=redis://..., postgresql://... or mysql://... two workers
    migrate once; on PostgreSQL also run after run (each run on a fresh database: what a run
    leaves in the store does not depend on the store); no password is shown."""
    fixture = {"redis": "redis_url", "postgres": "postgres_dsn", "mysql": "mysql_url"}[kind]
    url: str = request.getfixturevalue(fixture)
    env = {"EXAMPLE_BACKEND_URL": url}
    # A small burst: the migration runs at each worker's startup, whatever the requests.
    for _ in range(2 if kind == "postgres" else 1):
        output = run_example("--requests", "50", "--workers", "2", env=env)
        assert_migrated_once(output, workers=2)
    password = urlsplit(url).password
    assert password
    assert password not in output


# --- the main job's errors ------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_failing_example(
    env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[object, str, str]:
    """Run ``python -m example_app`` with ``env`` added, expecting it to fail: its exit status,
    stdout and stderr.

    In this process, as ``python -m`` runs it (runpy, ``__main__``): it fails before it starts
    a server, so a fresh interpreter would only import the app again.
    """
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["example_app", "--requests", "10"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("example_app", run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param(
            {"EXAMPLE_BACKEND_URL": "redis://127.0.0.1:{port}/0"},
            "EXAMPLE_BACKEND_URL",
            id="redis-not-listening",
        ),
        pytest.param(
            {"EXAMPLE_BACKEND_URL": "postgresql://app:s3cret@127.0.0.1:{port}/app"},
            "EXAMPLE_BACKEND_URL",
            id="postgres-not-listening",
        ),
        pytest.param(
            {"EXAMPLE_BACKEND_URL": "mysql://app:s3cret@127.0.0.1:{port}/app"},
            "EXAMPLE_BACKEND_URL",
            id="mysql-not-listening",
        ),
        pytest.param(
            {"EXAMPLE_BACKEND_URL": "mongodb://app:s3cret@127.0.0.1:{port}/app"},
            "EXAMPLE_BACKEND_URL",
            id="unknown-backend",
        ),
    ],
)
def test_python_m_example_app_without_its_backend_says_what_to_set_and_exits_2(
    env: dict[str, str],
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No server for the chosen backend (or no way to find one): one line naming the variable to
    set, exit status 2, no traceback, and no worker started."""
    port = free_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    status, out, err = run_failing_example(env, monkeypatch, capsys)
    assert status == 2, out + err
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("python -m example_app: ")
    assert variable in line
    assert "s3cret" not in line


def test_preflight_finds_nothing_wrong_with_a_listening_server() -> None:
    """A Redis URL or DSN where something accepts connections passes; so does the file backend."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert preflight.problem({}) is None
        assert preflight.problem({"EXAMPLE_BACKEND_URL": "file:///tmp/locks"}) is None
        assert preflight.problem({"EXAMPLE_BACKEND_URL": f"redis://127.0.0.1:{port}/0"}) is None
        dsn = f"postgresql://u:p@127.0.0.1:{port}/db"
        assert preflight.problem({"EXAMPLE_BACKEND_URL": dsn}) is None
        url = f"mysql://u:p@127.0.0.1:{port}/db"
        assert preflight.problem({"EXAMPLE_BACKEND_URL": url}) is None


def test_preflight_leaves_unix_sockets_and_many_hosts_to_the_driver() -> None:
    """Addresses that are not one host and port are not checked here."""
    assert preflight.problem({"EXAMPLE_BACKEND_URL": "redis:///run/redis.sock"}) is None
    dsn = "postgresql://u@h1:5432,h2:5432/db"
    assert preflight.problem({"EXAMPLE_BACKEND_URL": dsn}) is None


def test_preflight_masks_passwords() -> None:
    """masked() replaces the password of a URL, and leaves a URL without one alone."""
    assert preflight.masked("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert preflight.masked("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert preflight.masked("redis://h:1/0") == "redis://h:1/0"


def test_a_server_that_exits_before_serving_is_a_server_error() -> None:
    """serve() raises ServerError (which main() prints as one line) if the server dies first."""
    with (
        pytest.raises(burst.ServerError, match="exited with code"),
        burst.serve("example_app:nope"),
    ):
        pass  # pragma: no cover


# --- the burst's client ---------------------------------------------------------------------------


async def tiny_server(
    handler: Any,
) -> tuple[asyncio.base_events.Server, int]:
    """An HTTP/1.1 server on 127.0.0.1 whose connections ``handler(reader, writer)`` serves."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_paths(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request on the connection with its path, keeping the connection open."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


def test_the_client_sends_every_request_and_keeps_their_order() -> None:
    """Over fewer connections than requests, each connection carries several, in order."""

    async def main() -> tuple[list[client.Answer], int]:
        server, port = await tiny_server(echo_paths)
        async with server:
            connections = await client.open_connections("127.0.0.1", port, 3)
            seen: list[client.Answer] = []
            sent: list[bool] = []
            paths = [f"/{i}" for i in range(10)]
            answers = await client.burst(
                "127.0.0.1",
                port,
                connections,
                paths,
                on_sent=lambda: sent.append(True),
                on_answer=seen.append,
            )
        return answers, len(seen) * len(sent)

    answers, calls = asyncio.run(main())
    assert [a.body.decode() for a in answers] == [f"/{i}" for i in range(10)]
    assert all(a.status == 200 and not a.error and a.latency >= 0 for a in answers)
    assert calls == 10


def test_the_client_reports_a_closed_connection_as_failed_requests() -> None:
    """A server that hangs up fails the connection's requests, each with a reason; none raises."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def main() -> list[client.Answer]:
        server, port = await tiny_server(hang_up)
        async with server:
            connections = await client.open_connections("127.0.0.1", port, 2)
            return await client.burst("127.0.0.1", port, connections, ["/a", "/b", "/c"])

    answers = asyncio.run(main())
    assert [a.path for a in answers] == ["/a", "/b", "/c"]
    assert all(a.error.startswith(f"GET {a.path}: IncompleteReadError") for a in answers)


def test_the_client_cannot_connect_to_nothing() -> None:
    """open_connections raises the OSError of a connection that could not be opened."""
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(client.open_connections("127.0.0.1", free_port(), 2))


def test_the_client_refuses_what_it_does_not_speak() -> None:
    """A response with no Content-Length, or not HTTP/1.x, fails its request with ValueError."""

    def answering(response: bytes) -> Any:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
            writer.close()

        return handler

    async def main(response: bytes) -> client.Answer:
        server, port = await tiny_server(answering(response))
        async with server:
            connections = await client.open_connections("127.0.0.1", port, 1)
            (answer,) = await client.burst("127.0.0.1", port, connections, ["/"])
            return answer

    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert "ValueError: a response without Content-Length" in asyncio.run(main(chunked)).error
    assert "not an HTTP/1.x response" in asyncio.run(main(b"SSH-2.0-x\r\n\r\n")).error


# --- the burst's split: waited for a setup, or served warm ----------------------------------------


def answer(path: str, pid: int, received: float) -> client.Answer:
    """A 200 answer to ``path`` from ``pid``, received by its app at ``received``."""
    return client.Answer(
        path,
        sent=received - 0.01,
        answered=received + 0.5,
        status=200,
        headers={"x-worker": str(pid), "x-received-at": str(received)},
        body=b"{}",
    )


def test_requests_received_before_their_setup_was_ready_waited_for_it() -> None:
    """Requests that reached their worker before its setups were ready waited; later ones warm."""
    predict, stuff = "/predict?text=a", "/stuff?url=/items/1"
    workers = {
        7: {"ready_at": {"sentiment_model": 10.0, "http_client": 9.0}, "fetched_at": {}},
        8: {
            "ready_at": {"sentiment_model": 20.0, "http_client": 5.0},
            "fetched_at": {"/items/1": 12.0},
        },
    }
    answers = [
        answer(predict, 7, 9.5),  # waited 0.5 s
        answer(predict, 7, 10.5),  # warm
        answer(stuff, 8, 11.0),  # the fetch was ready at 12: waited 1 s
        answer(stuff, 8, 13.0),  # warm
        answer(stuff, 7, 11.0),  # worker 7 never fetched /items/1: counted as waiting
    ]
    result = burst.Result("http://127.0.0.1:1", [a.path for a in answers])
    burst.classify(result, answers, workers, wall_offset=0.0)
    assert len(result.waited) == 3
    assert len(result.warm) == 2
    assert result.parts[burst.WAITING] == pytest.approx([0.5, 0.0, 1.0, 0.0])
    assert result.parts[burst.TO_THE_APP] == pytest.approx([0.01] * 4)
    text = burst.report(result)
    assert "  waited    3 requests reached their worker before its setup was ready" in text
    assert "  warm      2 requests reached their worker after it, served warm" in text
    assert "    waiting for the setup  p50 " in text


def test_failed_and_refused_requests_are_errors_not_latencies_of_a_group() -> None:
    """An answer with an error, or a status other than 200, goes to the errors only."""
    failed = client.Answer("/predict?text=a", sent=1.0)
    failed.fail("ConnectionResetError")
    refused = answer("/predict?text=a", 7, 1.0)
    refused.status = 500
    result = burst.Result("http://127.0.0.1:1", ["/predict?text=a"] * 2)
    burst.classify(result, [failed, refused], {}, wall_offset=0.0)
    assert result.errors == [
        "GET /predict?text=a: ConnectionResetError",
        "GET /predict?text=a: 500 {}",
    ]
    assert result.waited == result.warm == []


def test_progress_lines_start_with_the_seconds_since_the_start() -> None:
    """Progress prints "[  0.0 s] text" to its stream, and nothing without one."""
    stream = io.StringIO()
    burst.Progress(stream)("starting")
    assert stream.getvalue() == "[  0.0 s] starting\n"
    burst.Progress()("nowhere")  # no stream: prints nothing


def test_the_report_says_how_many_were_in_flight_at_once() -> None:
    """With fewer connections than requests, the first line says how many went at a time."""
    sent = burst.paths(6)
    result = healthy_result(sent)
    assert burst.report(result).startswith("6 concurrent cold requests to uvicorn at ")
    result.connections = 2
    assert burst.report(result).startswith("6 cold requests, 2 at a time, to uvicorn at ")
