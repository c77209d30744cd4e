"""Teardown leaves nothing open: lifespan shutdown, a startup cut short, a loop that just ends."""

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_once import OnceClosedError, OnceLoopWarning, once, once_lifespan

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_a_startup_cancelled_half_way_cleans_up_what_it_made() -> None:
    """Cancelled while warming: the values already made are cleaned up, shielded."""
    closed: list[str] = []

    @once
    async def quick() -> AsyncIterator[str]:
        yield "quick"
        await anyio.sleep(0.01)  # a cleanup that awaits, under a cancelled scope
        closed.append("quick")

    @once
    async def never() -> str:
        await anyio.sleep_forever()
        raise AssertionError

    app = FastAPI(lifespan=once_lifespan(quick, never, shutdown_timeout=0.2))
    with anyio.move_on_after(0.1) as scope:
        async with app.router.lifespan_context(app):
            raise AssertionError("startup cannot finish")
    assert scope.cancelled_caught
    assert closed == ["quick"]


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
async def test_a_base_exception_from_a_warmed_once_reaches_the_server_as_itself(
    exc: type[BaseException],
) -> None:
    """SystemExit or KeyboardInterrupt in warm-up is raised as itself, not in an exception group."""

    @once
    async def boom() -> str:
        raise exc(3)

    @once
    async def other() -> str:
        await anyio.sleep(1)
        return "other"

    app = FastAPI(lifespan=once_lifespan(boom, other))
    with pytest.raises(exc) as raised:
        async with app.router.lifespan_context(app):
            raise AssertionError("startup cannot finish")
    assert type(raised.value) is exc


async def test_requests_during_shutdown_make_nothing_that_escapes_cleanup() -> None:
    """Under load at shutdown: work in flight is awaited and cleaned up; new attempts refused."""
    made: list[int] = []
    cleaned: list[int] = []

    @once(key=lambda k: k, maxsize=1000)
    async def item(k: int) -> AsyncIterator[int]:
        await anyio.sleep(0.002)
        made.append(k)
        yield k
        cleaned.append(k)

    app = FastAPI(lifespan=once_lifespan())

    @app.get("/item/{k}")
    async def get(value: Annotated[int, Depends(item)]) -> int:
        return value

    statuses: list[int] = []
    up, shutdown, down = anyio.Event(), anyio.Event(), anyio.Event()

    async def serve() -> None:
        async with LifespanManager(app):
            up.set()
            await shutdown.wait()
        down.set()

    async with client(app) as http, anyio.create_task_group() as group:

        async def request(k: int) -> None:
            statuses.append((await http.get(f"/item/{k}")).status_code)

        group.start_soon(serve)
        await up.wait()
        for k in range(400):
            group.start_soon(request, k)
            if k == 100:
                shutdown.set()
            if k % 10 == 0:
                await anyio.sleep(0.001)
            if down.is_set():
                assert sorted(cleaned) == sorted(made)  # all made so far is cleaned up
    assert down.is_set()
    assert sorted(cleaned) == sorted(made)  # and nothing was made that escaped cleanup
    assert 200 in statuses
    assert 503 in statuses  # refused with OnceClosedError once shutdown had begun
    assert set(statuses) == {200, 503}  # never a 500
    with pytest.raises(OnceClosedError, match="shut down"):
        await item(1)


async def test_shutdown_waits_at_most_its_timeout_for_a_hung_function(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung fn cannot hold the process: shutdown returns after shutdown_timeout, logging it."""
    started = anyio.Event()

    @once(name="app.hung")
    async def hung() -> str:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError

    app = FastAPI(lifespan=once_lifespan(shutdown_timeout=0.1))
    async with anyio.create_task_group() as group:
        with anyio.fail_after(5):
            async with app.router.lifespan_context(app):
                group.start_soon(hung)
                await started.wait()
        assert "still running: app.hung" in caplog.text
        group.cancel_scope.cancel()


async def test_a_new_lifespan_in_the_same_loop_serves_again() -> None:
    """After shutdown, a new lifespan reopens the loop's onces."""

    @once
    async def db() -> str:
        return "db"

    app = FastAPI(lifespan=once_lifespan(db))
    async with app.router.lifespan_context(app):
        assert await db() == "db"
    with pytest.raises(OnceClosedError):
        await db()
    async with app.router.lifespan_context(app):
        assert await db() == "db"


def test_values_left_to_the_end_of_their_loop_are_reported_once_per_once() -> None:
    """A loop that ends with values in service cleans them up and warns, once per once."""
    closed: list[str] = []

    @once(key=lambda name: name, name="app.client")
    async def client_for(name: str) -> AsyncIterator[str]:
        yield name
        closed.append(name)

    async def main() -> None:
        await client_for("a")
        await client_for("b")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
    assert sorted(closed) == ["a", "b"]
    reports = [w for w in caught if issubclass(w.category, OnceLoopWarning)]
    assert len(reports) == 1
    assert "app.client" in str(reports[0].message)
    assert "with TestClient(app)" in str(reports[0].message)


def test_a_bare_testclient_reports_its_per_request_loops() -> None:
    """TestClient(app) without `with` runs each request in a new loop: the values are reported."""
    closed: list[str] = []

    @once(name="app.http_client")
    async def http_client() -> AsyncIterator[str]:
        yield "client"
        closed.append("client")

    app = FastAPI()

    @app.get("/")
    async def root(c: Annotated[str, Depends(http_client)]) -> str:
        return c

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bare = TestClient(app)
        assert bare.get("/").json() == "client"
        assert bare.get("/").json() == "client"
    assert closed == ["client", "client"]
    reports = [w for w in caught if issubclass(w.category, OnceLoopWarning)]
    assert [str(w.message).split(":")[0] for w in reports] == ["app.http_client"] * 2


def test_with_testclient_nothing_is_reported() -> None:
    """The same app under `with TestClient(app)` and once_lifespan warns about nothing."""
    closed: list[str] = []

    @once
    async def http_client() -> AsyncIterator[str]:
        yield "client"
        closed.append("client")

    app = FastAPI(lifespan=once_lifespan())

    @app.get("/")
    async def root(c: Annotated[str, Depends(http_client)]) -> str:
        return c

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with TestClient(app) as http:
            assert http.get("/").json() == "client"
            assert http.get("/").json() == "client"
    assert closed == ["client"]
    assert not [w for w in caught if issubclass(w.category, OnceLoopWarning)]


logging.getLogger("fastapi_once").setLevel(logging.INFO)
