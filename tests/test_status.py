"""Observability: status() snapshots, the registry, and the log lines an operator sees."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import anyio
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceStatus, once, once_lifespan, registry
from fastapi_once._readiness import kick

pytestmark = pytest.mark.anyio


async def test_status_follows_idle_running_ready_failed() -> None:
    """state moves through idle, running, ready; a failure shows failed with its type."""
    gate = anyio.Event()
    fail = True

    @once
    async def get_db() -> str:
        await gate.wait()
        if fail:
            raise ConnectionError("password=hunter2 rejected")
        return "db"

    assert get_db.status() == OnceStatus(name=get_db.name, state="idle")
    async with anyio.create_task_group() as group:
        group.start_soon(get_db)
        await anyio.wait_all_tasks_blocked()
        assert get_db.status().state == "running"
        group.cancel_scope.cancel()
    gate.set()
    await wait_until(lambda: get_db.status().state != "running")
    failed = get_db.status()
    assert failed.state == "failed"
    assert failed.last_error_type == "ConnectionError"
    assert failed.last_error_message is None  # exception text can hold secrets
    assert get_db.status(details=True).last_error_message == "password=hunter2 rejected"
    fail = False
    assert await get_db() == "db"
    ready = get_db.status()
    assert ready.state == "ready"
    assert ready.last_error_type is None
    assert ready.attempts == 2
    assert isinstance(ready.made_at, datetime)
    assert ready.made_at.tzinfo is timezone.utc
    assert ready.last_duration is not None


async def test_status_counts_hits_and_joins() -> None:
    """hits: calls served from the value; joins: calls that joined an attempt in flight."""
    gate = anyio.Event()

    @once
    async def load() -> int:
        await gate.wait()
        return 1

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(load)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    for _ in range(5):
        await load()
    status = load.status()
    assert (status.attempts, status.joins, status.hits) == (1, 9, 5)


async def test_a_keyed_status_counts_keys_per_state(clock: FakeClock) -> None:
    """For keyed onces: counts per state and size."""

    @once(key=lambda url: url, cooldown=10)
    async def get_stuff(url: str) -> str:
        if url == "/bad":
            raise ConnectionError
        return url

    await get_stuff("/a")
    await get_stuff("/b")
    with pytest.raises(ConnectionError):
        await get_stuff("/bad")
    status = get_stuff.status()
    assert status.state == "ready"
    assert status.size == 2
    assert status.keys == {"ready": 2, "refreshing": 0, "running": 0, "failed": 1}


def test_the_registry_lists_every_once() -> None:
    """registry() returns every once in the process, sorted by name."""

    @once(name="zz.registry.b")
    async def b() -> None:
        return None

    @once(name="zz.registry.a")
    async def a() -> None:
        return None

    names = [o.name for o in registry()]
    assert names == sorted(names)
    assert {a, b} <= set(registry())


async def test_the_log_tells_an_operator_what_happens(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    """Started, ready (with duration), failed, retried, refreshed and cleaned up are logged."""
    calls = 0

    @once(name="db", retries=1, backoff=0.001, refresh=5, ttl=50)
    async def get_db() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("secret-dsn")
        yield calls

    with caplog.at_level(logging.INFO, logger="fastapi_once"):
        assert await get_db() == 2
        clock.advance(5)
        await get_db()
        await wait_until(lambda: get_db.status().state != "refreshing")
        await get_db.reset()
    lines = [r.getMessage() for r in caplog.records]
    assert "db: attempt started" in lines
    assert "db: try 1 of 2 failed with ConnectionError; retrying in" in " ".join(lines)
    assert any(line.startswith("db: ready in ") for line in lines)
    assert "db: refresh started" in lines
    assert any(line.startswith("db: refreshed in ") for line in lines)
    assert lines.count("db: cleaned up") == 2
    assert "secret-dsn" not in caplog.text


async def test_the_warm_up_logs_its_progress(caplog: pytest.LogCaptureFixture) -> None:
    """Startup logs 'warming i/n: name ready in s' for each once."""

    @once(name="cache")
    async def cache() -> int:
        return 1

    @once(name="model")
    async def model() -> int:
        await anyio.sleep(0.01)
        return 2

    with caplog.at_level(logging.INFO, logger="fastapi_once"):
        async with LifespanManager(FastAPI(lifespan=once_lifespan(cache, model))):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert "warming 2 once(s): cache, model" in lines
    assert any(line.startswith("warming 1/2: cache ready in ") for line in lines)
    assert any(line.startswith("warming 2/2: model ready in ") for line in lines)


async def test_a_failing_warm_up_is_logged_by_type(caplog: pytest.LogCaptureFixture) -> None:
    """A warm-up failure names the once and the exception type, not its text."""

    @once(name="db")
    async def db() -> None:
        raise ConnectionError("token=abc")

    app = FastAPI(lifespan=once_lifespan(db))
    with caplog.at_level(logging.INFO, logger="fastapi_once"), pytest.raises(ConnectionError):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover
    assert "warming db failed with ConnectionError" in caplog.text
    assert "token=abc" not in caplog.text


def test_status_outside_a_loop_reports_the_last_loop_used() -> None:
    """From a thread with no running loop (e.g. a sync route), status() reads the last loop
    used, while it lives; a closed loop is forgotten with what it kept."""

    @once
    async def load() -> int:
        return 1

    loop = asyncio.new_event_loop()
    serving = threading.Thread(target=loop.run_forever, daemon=True)
    serving.start()
    try:
        assert asyncio.run_coroutine_threadsafe(load(), loop).result(timeout=10) == 1
        assert load.status().state == "ready"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        serving.join(timeout=10)
        loop.close()
    del loop
    gc.collect()
    assert load.status().state == "idle"


async def test_a_keyed_once_whose_keys_all_failed_is_failed(clock: FakeClock) -> None:
    """No value kept and failures in their cooldown: the keyed once is failed."""

    @once(key=lambda url: url, cooldown=5, maxsize=2)
    async def get_stuff(url: str) -> str:
        raise ConnectionError(url)

    for url in ["/a", "/b", "/c"]:
        with pytest.raises(ConnectionError):
            await get_stuff(url)
    status = get_stuff.status()
    assert status.state == "failed"
    assert status.keys is not None
    assert status.keys["failed"] == 2  # failures are bounded by maxsize, like values
    await get_stuff.reset()
    assert get_stuff.status().state == "idle"  # reset forgets the errors too


async def test_a_probe_kick_respects_the_cooldown_and_replaces_an_expired_value(
    clock: FakeClock,
) -> None:
    """kick starts nothing inside a cooldown; past ttl it makes a new value."""
    calls = 0

    @once(ttl=10, cooldown=5)
    async def load() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError
        return calls

    assert await load() == 1
    assert not kick(load, None)  # ready: nothing to do
    clock.advance(10)
    assert kick(load, None)  # expired: starts attempt 2, which fails
    await wait_until(lambda: load.status().state == "failed")
    assert not kick(load, None)  # in its cooldown
    clock.advance(5)
    assert kick(load, None)
    await wait_until(lambda: load.status().state == "ready")
    assert await load() == 3


async def test_status_never_calls_a_value_past_its_ttl_ready_or_refreshing(
    clock: FakeClock,
) -> None:
    """Past ttl with a refresh in flight: running (calls would wait), not refreshing or ready."""
    gate = anyio.Event()
    runs = 0

    @once(refresh=5, ttl=10)
    async def load() -> int:
        nonlocal runs
        runs += 1
        if runs > 1:
            await gate.wait()
        return runs

    assert await load() == 1
    clock.advance(6)
    assert await load() == 1
    assert load.status().state == "refreshing"
    clock.advance(5)
    status = load.status()
    assert status.state == "running"
    assert status.made_at is None
    gate.set()
    await wait_until(lambda: load.status().state == "ready")


async def test_keyed_counts_are_never_negative_when_a_refreshing_value_expires(
    clock: FakeClock,
) -> None:
    """A keyed value that expires during its refresh counts as running; no count below zero."""
    gate = anyio.Event()
    runs = 0

    @once(key=lambda url: url, refresh=5, ttl=10)
    async def get_stuff(url: str) -> str:
        nonlocal runs
        runs += 1
        if runs > 1:
            await gate.wait()
        return url

    await get_stuff("/a")
    clock.advance(6)
    await get_stuff("/a")  # starts the refresh
    clock.advance(5)
    status = get_stuff.status()
    assert status.keys == {"ready": 0, "refreshing": 0, "running": 1, "failed": 0}
    assert status.size == 0
    assert status.state == "running"
    gate.set()
    await wait_until(lambda: get_stuff.status().state == "ready")


async def test_status_of_an_expired_value_says_idle_like_the_next_call_would(
    clock: FakeClock,
) -> None:
    """Past ttl with no refresh: idle (the next call makes a new value)."""

    @once(ttl=10)
    async def load() -> int:
        return 1

    await load()
    clock.advance(10)
    assert load.status().state == "idle"
