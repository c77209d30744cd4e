"""A loop that ends without closing its backend does not wait forever on the keyed listener.

``asyncio.run()`` cancels every task left when its main coroutine returns, once, natively. A
driver may lose that cancellation (``asyncio.wait_for`` on Python 3.11 drops it when the
guarded call finished in the same turn), and the listener is a loop that never returns on its
own. These tests force the lost cancellation and check that the loop still ends; each loop runs
in a thread, so a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from backend_servers import PostgresServer, RedisServer, require

from fastapi_once import once
from fastapi_once.backends import Backend
from fastapi_once.backends._wakeups import Listeners, Wakeups

# How long a loop may take to end after its main coroutine returned. A loop that ends takes
# milliseconds; one whose listener lost its cancellation never ends.
ENDS_WITHIN = 10.0


def run_in_a_thread(main: Callable[[], Coroutine[Any, Any, None]]) -> float:
    """Run ``asyncio.run(main())`` in a thread; return the seconds from main's return to the
    loop's end. Fails (the thread is left behind) if the loop does not end in time."""
    returned: list[float] = []
    errors: list[BaseException] = []
    done = threading.Event()

    async def timed() -> None:
        try:
            await main()
        finally:
            returned.append(time.monotonic())
            done.set()

    def target() -> None:
        try:
            asyncio.run(timed())
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
            done.set()

    thread = threading.Thread(target=target, daemon=True, name="loop under test")
    thread.start()
    assert done.wait(30), "main() did not return"
    thread.join(ENDS_WITHIN)
    ended = time.monotonic()
    assert not thread.is_alive(), "the event loop never ended: its listener kept it waiting"
    assert errors == []
    return ended - returned[0]


def swallowing_once(listen: Callable[[Wakeups], Awaitable[None]]) -> Callable[..., Any]:
    """Wrap a listen function so that the first cancellation it gets is lost, as a driver's
    ``wait_for`` loses it, and it goes on listening."""

    async def listen_on(wakeups: Wakeups) -> None:
        lost = False
        while True:
            try:
                await listen(wakeups)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True  # the cancellation's count stays, as after wait_for's loss

    return listen_on


def test_a_loop_ends_when_its_listener_loses_the_shutdowns_cancellation() -> None:
    """The listener loses the one cancellation the loop's shutdown sends; the loop still ends,
    without stop() ever being called."""
    seen: list[int] = []

    async def listen(wakeups: Wakeups) -> None:
        wakeups.listening.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        listeners = Listeners(swallowing_once(listen))
        wakeups = listeners.start()
        await wakeups.listening.wait()
        seen.append(1)

    took = run_in_a_thread(main)
    assert seen == [1]
    assert took < ENDS_WITHIN


@pytest.mark.parametrize("unwinding", [False, True], ids=["at-once", "awaiting-a-cleanup"])
def test_a_timeout_inside_the_listener_does_not_end_it(unwinding: bool) -> None:
    """A driver's own timeouts cancel the listener's task natively and take the cancellation
    back, at once or after awaiting a cleanup on the way out (a turn of the loop, a wait on the
    network); the listener goes on (a later stop() ends it)."""
    timeouts = 0
    five = asyncio.Event()

    async def read() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            if unwinding:
                await asyncio.sleep(0)  # the driver's cleanup, one loop turn
                await asyncio.sleep(0.05)  # and one that waits on the network

    async def listen(wakeups: Wakeups) -> None:
        nonlocal timeouts
        wakeups.listening.set()
        while True:
            try:
                async with asyncio.timeout(0.01):  # as redis-py's reads time out when idle
                    await read()
            except TimeoutError:
                timeouts += 1
                if timeouts == 5:
                    five.set()

    async def main() -> None:
        listeners = Listeners(listen)
        listeners.start()
        await asyncio.wait_for(five.wait(), 30)
        assert asyncio.get_running_loop() in listeners
        await asyncio.wait_for(listeners.stop(), ENDS_WITHIN)

    if not hasattr(asyncio, "timeout"):  # Python 3.10
        pytest.skip("asyncio.timeout is Python 3.11+")
    run_in_a_thread(main)
    assert timeouts >= 5


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    require("redis")
    return redis_server.url


def keyed_call_without_aclose(backend: Callable[[], Backend]) -> Callable[[], Any]:
    """A main() making one keyed across= call on a fresh backend, never closing it."""

    async def main() -> None:
        async def fetch(url: str) -> str:
            return url.upper()

        fetcher = once(fetch, key=lambda url: url, ttl=60, across=backend())
        assert await fetcher("/a") == "/A"

    return main


def test_a_redis_listener_that_loses_the_cancellation_does_not_hold_the_loop(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Redis listener, its read losing the shutdown's cancellation as redis-py's
    wait_for can on Python 3.11: the loop that used a keyed once and never closed its backend
    ends."""
    from redis.asyncio.client import PubSub

    from fastapi_once.backends import RedisBackend

    real_get_message = PubSub.get_message
    lost: list[int] = []

    async def get_message(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real_get_message(self, *args, **kwargs)
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(1)
            return None  # the first cancellation is dropped

    monkeypatch.setattr(PubSub, "get_message", get_message)
    namespace = "t" + secrets.token_hex(6)
    took = run_in_a_thread(
        keyed_call_without_aclose(lambda: RedisBackend(redis_url, namespace=namespace))
    )
    assert lost, "the shutdown's cancellation never reached the listener's read"
    assert took < ENDS_WITHIN


def test_a_postgres_listener_that_loses_the_cancellation_does_not_hold_the_loop(
    postgres_server: PostgresServer,
) -> None:
    """The real PostgreSQL listener, losing the shutdown's cancellation once: the loop that used
    a keyed once and never closed its backend ends."""
    require("asyncpg")
    from fastapi_once.backends import PostgresBackend

    def backend() -> Backend:
        made = PostgresBackend(postgres_server.dsn, table="t" + secrets.token_hex(6))
        listeners = made._listeners  # the backend's own listener, made to lose a cancellation
        listeners._listen = swallowing_once(listeners._listen)
        return made

    took = run_in_a_thread(keyed_call_without_aclose(backend))
    assert took < ENDS_WITHIN


def test_loops_that_never_close_their_redis_backend_all_end(redis_url: str) -> None:
    """Many loops in turn, each making a keyed call on a fresh Redis backend and never closing
    it: every one ends (one that does not fails the test rather than hanging it)."""
    from fastapi_once.backends import RedisBackend

    namespace = "t" + secrets.token_hex(6)
    for _ in range(25):
        run_in_a_thread(
            keyed_call_without_aclose(lambda: RedisBackend(redis_url, namespace=namespace))
        )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_lifespan_closes_the_stores_it_built_after_the_values_cleanups(
    redis_url: str, anyio_backend: str
) -> None:
    """once_lifespan's shutdown closes the backends its onces built from a URL or a factory
    (their listeners end with it, not at the loop's end), after the values' cleanups and
    before it returns; a backend object the app made is left to the app."""
    from collections.abc import AsyncIterator

    from fastapi import FastAPI

    from fastapi_once import once_lifespan
    from fastapi_once.backends import RedisBackend

    events: list[str] = []

    class Recording(RedisBackend):
        async def aclose(self) -> None:
            events.append(f"closed {self.namespace}")
            await super().aclose()

    namespace = "t" + secrets.token_hex(6)

    async def fetch(url: str) -> str:
        return url.upper()

    async def config() -> str:
        return "config"

    async def client() -> AsyncIterator[str]:
        yield "client"
        events.append("cleaned up")

    own = Recording(redis_url, namespace=namespace + "own")

    def listeners() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "fastapi_once listener"]

    fetcher = once(
        fetch, key=lambda url: url, ttl=60, across=lambda: Recording(redis_url, namespace=namespace)
    )
    shared = once(config, across=own)
    lifespan = once_lifespan(client)
    async with lifespan(FastAPI()):
        assert await fetcher("/a") == "/A"
        assert await shared() == "config"
        assert len(listeners()) == 2  # the built backend's, and the app's own (it listens too)
        assert events == []
    assert events == ["cleaned up", f"closed {namespace}"]
    assert len(listeners()) == 1  # the app's own backend's, which the app closes
    assert asyncio.get_running_loop() in own._listeners
    async with lifespan(FastAPI()):  # the next lifespan's calls build a new backend
        assert await fetcher("/b") == "/B"
    assert events[2:] == ["cleaned up", f"closed {namespace}"]
    assert f"closed {namespace}own" not in events
    await own.aclose()


async def answer() -> int:
    return 42


@pytest.mark.kinds("file", "redis", "postgres", "mysql")
def test_closed_loops_that_used_a_store_are_collected(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """One backend used in three asyncio.run() loops (a value made, a watch entered), never
    closed: once each loop has ended, nothing the store kept for it holds it alive (and its
    connections were closed: an unclosed one would warn, failing the test)."""
    backend: Any
    if kind == "file":
        from fastapi_once.backends import FileLockBackend

        backend = FileLockBackend(str(tmp_path))
    elif kind == "redis":
        require("redis")
        from fastapi_once.backends import RedisBackend

        url = request.getfixturevalue("redis_server").url
        backend = RedisBackend(url, namespace=f"loops-{secrets.token_hex(4)}")
    elif kind == "postgres":
        require("asyncpg")
        from fastapi_once.backends import PostgresBackend

        dsn = request.getfixturevalue("postgres_server").dsn
        backend = PostgresBackend(dsn, table=f"loops_{secrets.token_hex(4)}")
    else:
        require("asyncmy")
        from fastapi_once.backends import MySQLBackend

        url = request.getfixturevalue("mariadb_server").url
        backend = MySQLBackend(url, table=f"loops_{secrets.token_hex(4)}")
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        assert await backend.run_keyed("tests.loops", "ab" * 20, answer, ttl=30) == 42
        async with backend.watch("tests.loops", "cd" * 20):
            pass

    for _ in range(3):
        run_in_a_thread(main)
    gc.collect()
    assert [ref() for ref in loops] == [None] * 3
