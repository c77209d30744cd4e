"""once_lifespan: warm before serving, wrap the user's lifespan, clean up at shutdown."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Request

from fastapi_once import once, once_lifespan

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_listed_onces_are_made_before_the_app_serves() -> None:
    """Startup makes the listed values; the first request finds them ready."""
    runs: list[str] = []

    @once
    async def get_db() -> str:
        runs.append("db")
        return "db"

    @once
    def run_migrations() -> str:
        runs.append("migrations")
        return "migrated"

    app = FastAPI(lifespan=once_lifespan(get_db, run_migrations))

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db

    async with LifespanManager(app) as manager:
        assert sorted(runs) == ["db", "migrations"]
        async with client(manager.app) as http:
            assert (await http.get("/")).json() == "db"
    assert sorted(runs) == ["db", "migrations"]


async def test_listed_onces_are_warmed_concurrently() -> None:
    """Both warm-ups are in flight at the same time (each waits until the other started)."""
    started: list[str] = []
    both = anyio.Event()

    async def warm(name: str) -> str:
        started.append(name)
        if len(started) == 2:
            both.set()
        with anyio.fail_after(5):
            await both.wait()
        return name

    @once
    async def a() -> str:
        return await warm("a")

    @once
    async def b() -> str:
        return await warm("b")

    async with LifespanManager(FastAPI(lifespan=once_lifespan(a, b))):
        assert sorted(started) == ["a", "b"]


async def test_onces_that_depend_on_each_other_are_made_in_order_once() -> None:
    """b depends on a; listing b first still makes a once, before b."""
    order: list[str] = []

    @once
    async def a() -> str:
        await anyio.sleep(0.01)
        order.append("a")
        return "a"

    @once
    async def b(value: str = Depends(a)) -> str:
        order.append("b")
        return value + "b"

    async with LifespanManager(FastAPI(lifespan=once_lifespan(b, a))):
        assert order == ["a", "b"]
        assert await b() == "ab"


async def test_a_failing_warm_up_fails_startup_with_the_original_exception() -> None:
    """Startup raises the once's own exception; what the others made is cleaned up."""
    error = ConnectionError("database is down")
    closed: list[str] = []

    @once
    async def get_cache() -> AsyncIterator[str]:
        yield "cache"
        closed.append("cache")

    @once
    async def get_db() -> str:
        await anyio.sleep(0.01)
        raise error

    app = FastAPI(lifespan=once_lifespan(get_cache, get_db))
    with pytest.raises(ConnectionError) as info:
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover
    assert info.value is error
    assert closed == ["cache"]


async def test_the_users_lifespan_is_wrapped_and_its_state_reaches_requests() -> None:
    """The user's lifespan runs inside: after warm-up, before cleanup; its state is served."""
    log: list[str] = []

    @once
    async def get_db() -> AsyncIterator[str]:
        log.append("db made")
        yield "db"
        log.append("db cleaned up")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        log.append("user startup")
        yield {"greeting": "hello"}
        log.append("user shutdown")

    app = FastAPI(lifespan=once_lifespan(get_db, lifespan=lifespan))

    @app.get("/")
    async def root(request: Request, db: str = Depends(get_db)) -> str:
        return f"{request.state.greeting} {db}"

    async with LifespanManager(app) as manager, client(manager.app) as http:
        assert (await http.get("/")).json() == "hello db"
    assert log == ["db made", "user startup", "user shutdown", "db cleaned up"]


async def test_shutdown_cleans_up_every_value_once_newest_first_then_forgets() -> None:
    """Warm and lazy values alike are cleaned up once, in reverse order; the next run is fresh."""
    log: list[str] = []

    def resource(name: str) -> Any:
        async def make() -> AsyncIterator[str]:
            log.append(f"make {name}")
            yield name
            log.append(f"close {name}")

        make.__qualname__ = name
        return once(make)

    first, lazy, last = resource("first"), resource("lazy"), resource("last")
    app = FastAPI(lifespan=once_lifespan(first))

    @app.get("/")
    async def root(a: str = Depends(lazy), b: str = Depends(last)) -> str:
        return a + b

    for _ in range(2):
        async with LifespanManager(app) as manager, client(manager.app) as http:
            await http.get("/")
            await http.get("/")
    one_run = ["make first", "make lazy", "make last", "close last", "close lazy", "close first"]
    assert log == one_run * 2


async def test_a_failing_cleanup_does_not_stop_the_others() -> None:
    """Every cleanup runs even if one fails; the failure is logged and raised at shutdown."""
    closed: list[str] = []

    @once
    async def good() -> AsyncIterator[str]:
        yield "good"
        closed.append("good")

    @once
    async def bad() -> AsyncIterator[str]:
        yield "bad"
        raise OSError("socket already closed")

    async with LifespanManager(FastAPI(lifespan=once_lifespan(good))):
        pass
    assert closed == ["good"]

    app = FastAPI(lifespan=once_lifespan(good, bad))
    with pytest.raises(OSError, match="socket already closed"):
        async with app.router.lifespan_context(app):
            pass
    assert closed == ["good", "good"]


async def test_a_failing_cleanup_is_logged_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cleanup failure is logged with its type; the text (maybe a secret) only at DEBUG."""

    @once
    async def bad() -> AsyncIterator[str]:
        yield "bad"
        raise OSError("password=hunter2")

    await bad()
    with (
        caplog.at_level(logging.INFO, logger="fastapi_once"),
        pytest.raises(OSError, match="hunter2"),
    ):
        await bad.reset()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"{bad.name}: cleanup failed with OSError"]
    assert all(r.exc_info is None for r in errors)
    assert "hunter2" not in caplog.text


async def test_several_failing_cleanups_raise_an_exception_group() -> None:
    """Two failing cleanups: both run, and shutdown raises a group of both."""

    @once
    async def one() -> AsyncIterator[int]:
        yield 1
        raise OSError("one")

    @once
    async def two() -> AsyncIterator[int]:
        yield 2
        raise OSError("two")

    app = FastAPI(lifespan=once_lifespan(one, two))
    with pytest.raises(BaseExceptionGroup) as info:
        async with app.router.lifespan_context(app):
            pass
    assert sorted(str(e) for e in info.value.exceptions) == ["one", "two"]


async def test_a_host_app_warms_and_cleans_up_for_a_mounted_sub_app() -> None:
    """The sub-app's lifespan does not run; the host's once_lifespan does its work."""
    log: list[str] = []

    @once
    async def load_model() -> AsyncIterator[str]:
        log.append("loaded")
        yield "model"
        log.append("unloaded")

    sub = FastAPI(lifespan=once_lifespan(load_model))

    @sub.get("/predict")
    async def predict(model: str = Depends(load_model)) -> str:
        return model

    host = FastAPI(lifespan=once_lifespan(load_model))
    host.mount("/ml", sub)
    async with LifespanManager(host) as manager:
        assert log == ["loaded"]
        async with client(manager.app) as http:
            assert (await http.get("/ml/predict")).json() == "model"
    assert log == ["loaded", "unloaded"]


async def test_onces_replaced_by_dependency_overrides_are_not_warmed() -> None:
    """Tests that override a once do not pay for (or reach) the real setup."""
    runs = 0

    @once
    async def get_db() -> str:
        nonlocal runs
        runs += 1
        return "real"

    app = FastAPI(lifespan=once_lifespan(get_db))
    app.dependency_overrides[get_db] = lambda: "fake"

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db

    async with LifespanManager(app) as manager, client(manager.app) as http:
        assert (await http.get("/")).json() == "fake"
    assert runs == 0


async def test_warm_up_honours_overrides_of_sub_dependencies() -> None:
    """Values warmed at startup resolve sub-dependencies with the app's overrides."""

    def get_settings() -> str:
        return "production"

    @once
    async def get_db(settings: str = Depends(get_settings)) -> str:
        return f"db for {settings}"

    app = FastAPI(lifespan=once_lifespan(get_db))
    app.dependency_overrides[get_settings] = lambda: "test"
    async with LifespanManager(app):
        assert await get_db() == "db for test"


async def test_plain_functions_are_taken_as_their_once() -> None:
    """once_lifespan(fn) warms once(fn): the same once the routes depend on."""
    runs = 0

    async def get_db() -> str:
        nonlocal runs
        runs += 1
        return "db"

    app = FastAPI(lifespan=once_lifespan(get_db))

    @app.get("/")
    async def root(db: str = Depends(once(get_db))) -> str:
        return db

    async with LifespanManager(app) as manager:
        assert runs == 1
        async with client(manager.app) as http:
            assert (await http.get("/")).json() == "db"
    assert runs == 1


def test_a_keyed_once_cannot_be_warmed() -> None:
    """A keyed once has no single value: TypeError at once_lifespan() time."""

    @once(key=lambda url: url)
    async def get_stuff(url: str) -> str:
        return url

    with pytest.raises(TypeError, match="keyed once"):
        once_lifespan(get_stuff)
