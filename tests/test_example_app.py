"""The example app: its routes, a cold burst in-process, mounting, and ``python -m example_app``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import example_app
from example_app import burst
from fastapi_once import once_lifespan, reset_all

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_stats(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Zero the example's counters; use a temporary database unless a test sets one."""
    monkeypatch.delenv("EXAMPLE_DB", raising=False)
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


def test_burst_result_fails_when_a_setup_ran_twice() -> None:
    """The report's verdict is FAILED when /stats shows a setup that ran more than once."""
    sent = burst.paths(4)
    result = burst.Result("http://127.0.0.1:1", sent, latencies=[0.1, 0.2])
    for path in sent:
        result.bodies[path].add("same")
    result.stats = burst.expected_stats(sent)
    assert result.ok
    result.stats["setups"]["sentiment_model"] = 2
    assert not result.ok
    assert burst.report(result).splitlines()[-1].startswith("FAILED")


def test_burst_result_fails_when_a_request_failed_or_values_differ() -> None:
    """Any failed request, or two different answers for one path, make the verdict FAILED."""
    sent = burst.paths(2)
    result = burst.Result("http://127.0.0.1:1", sent, stats=burst.expected_stats(sent))
    for path in sent:
        result.bodies[path].add("same")
    assert result.ok
    result.bodies[sent[0]].add("different")
    assert not result.ok
    result.bodies[sent[0]].discard("different")
    result.errors.append("GET /predict: 500")
    assert not result.ok


def test_percentile_is_nearest_rank() -> None:
    """p50 of 1..100 is 50, p99 is 99, p100 is the maximum, and p0 the minimum."""
    values = [float(v) for v in range(1, 101)]
    assert [burst.percentile(values, p) for p in (0, 50, 99, 100)] == [1, 50, 99, 100]


def test_python_m_example_app_reports_one_setup_each_and_exits_0() -> None:
    """The main job runs uvicorn, bursts 300 cold requests, and reports each setup ran once."""
    completed = subprocess.run(
        [sys.executable, "-m", "example_app", "--requests", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("300 concurrent cold requests to uvicorn at http://127.0.0.1:")
    assert "database=1 schema=1" in lines[1]
    assert "sentiment_model=1" in lines[1]
    assert "http_client=1" in lines[1]
    assert "/items/1=1 /items/2=1 /items/3=1 /items/4=1 /items/5=1" in lines[2]
    assert "300 ok, 0 errors" in lines[3]
    assert lines[-1].startswith("OK")
