"""once(on_backend_error=): what a call does when its store cannot be reached, and bad URLs."""

from __future__ import annotations

import logging
import secrets

import anyio
import pytest
from memory_store import MemoryServer, MemoryStore

from fastapi_once import once
from fastapi_once.backends import BackendError


@pytest.fixture
def name() -> str:
    return f"tests.fallback.{secrets.token_hex(4)}"


@pytest.mark.anyio
async def test_a_keyed_once_makes_values_here_while_the_store_is_down_by_default(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Store down: each key is made once in this process (its callers share the run), one
    WARNING for the outage; when the store answers, new keys are shared fleet-wide again."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        await anyio.sleep(0.05)
        return f"stuff of {url}"

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=MemoryStore(server), name=name)
    server.down = True
    results: list[str] = []
    async with anyio.create_task_group() as tg:
        for url in ["a", "a", "a", "b"]:

            async def call(url: str = url) -> None:
                results.append(await stuff(url))

            tg.start_soon(call)
    assert sorted(results) == ["stuff of a"] * 3 + ["stuff of b"]
    assert sorted(runs) == ["a", "b"]
    warnings = [
        r for r in caplog.records if r.name == "fastapi_once" and r.levelno >= logging.WARNING
    ]
    assert [r.event for r in warnings] == ["backend_fallback"]  # type: ignore[attr-defined]
    server.down = False
    assert await stuff("c") == "stuff of c"
    assert server.records[name, next(k for (n, k) in server.records if n == name)].value


@pytest.mark.anyio
async def test_an_unkeyed_once_raises_backend_error_by_default(name: str) -> None:
    """An unkeyed once is often a migration: it must never run unguarded."""
    server = MemoryServer()
    server.down = True
    runs = 0

    async def migrate() -> str:
        nonlocal runs
        runs += 1
        return "done"

    job = once(migrate, across=MemoryStore(server), name=name)
    with pytest.raises(BackendError):
        await job()
    assert runs == 0


@pytest.mark.anyio
async def test_the_policy_can_be_chosen_either_way(name: str) -> None:
    server = MemoryServer()
    server.down = True

    async def job() -> str:
        return "made"

    async def keyed(k: str) -> str:
        return "made"

    local = once(job, across=MemoryStore(server), name=name, on_backend_error="local")
    strict = once(
        keyed,
        key=lambda k: k,
        ttl=60,
        across=MemoryStore(server),
        name=name + ".keyed",
        on_backend_error="raise",
    )
    assert await local() == "made"
    with pytest.raises(BackendError):
        await strict("k")


def test_on_backend_error_is_checked(name: str) -> None:
    async def job() -> str:
        return "x"

    with pytest.raises(ValueError, match=r"on_backend_error='ignore'.*'local'.*'raise'"):
        once(job, across=MemoryStore(MemoryServer()), name=name, on_backend_error="ignore")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"on_backend_error= applies only with across="):
        once(job, name=name + ".2", on_backend_error="local")


def test_a_redis_url_whose_database_is_not_a_number_is_refused_naming_the_part(
    name: str,
) -> None:
    """redis://host/abc: the driver would use database 0 and share records with it."""

    async def job() -> str:
        return "x"

    with pytest.raises(ValueError, match=rf"once\({name}, across=.*database part /abc"):
        once(job, across="redis://:pw@127.0.0.1:6379/abc", name=name)
    from fastapi_once.backends import backend_from_url

    with pytest.raises(ValueError, match="database part /abc") as info:
        backend_from_url("redis://:pw@127.0.0.1:6379/abc")
    assert "pw" not in str(info.value)


@pytest.mark.anyio
async def test_a_factorys_bad_url_is_an_error_naming_the_once(name: str) -> None:
    async def job() -> str:
        return "x"

    bad = once(job, across=lambda: "mongodb://db/x", name=name)
    with pytest.raises(ValueError, match=rf"once\({name}, across=.*unknown scheme"):
        await bad()


@pytest.mark.anyio
async def test_under_local_a_kept_stale_value_is_served_before_making_one_here(name: str) -> None:
    """Past its ttl, a value kept by stale_if_error= is served while the store is down: no
    run in this process (a failed try to replace it is what stale_if_error= is for)."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        return f"{url} #{len(runs)}"

    stuff = once(
        get_stuff,
        key=lambda url: url,
        ttl=0.2,
        stale_if_error=60,
        across=MemoryStore(server),
        name=name,
    )
    assert await stuff("a") == "a #1"
    server.down = True
    await anyio.sleep(0.3)  # past the ttl: the value is kept, stale
    assert await stuff("a") == "a #1"
    assert runs == ["a"]
    assert await stuff("b") == "b #2"  # no value kept: made here
