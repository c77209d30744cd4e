"""Every kind of function: async def, def (in a worker thread), async and sync generators."""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from fastapi_once import once

pytestmark = pytest.mark.anyio


async def test_async_def_value_is_what_it_returns() -> None:
    """An async def's return value is the value."""

    @once
    async def make() -> str:
        return "value"

    assert await make() == "value"


async def test_a_def_runs_in_a_worker_thread_and_never_blocks_the_loop() -> None:
    """A def runs off the event loop: the loop keeps running while it blocks."""
    loop_thread = threading.get_ident()
    released = threading.Event()

    @once
    def read_settings() -> tuple[int, bool]:
        # Blocks until the event loop releases it: on the loop's thread this would deadlock.
        return threading.get_ident(), released.wait(timeout=10)

    async with anyio.create_task_group() as group:
        group.start_soon(read_settings)
        await anyio.sleep(0.05)
        released.set()
    thread, was_released = await read_settings()
    assert thread != loop_thread
    assert was_released


async def test_an_async_generator_yields_the_value_and_cleans_up_after_yield() -> None:
    """Async generator: the yielded object is the value; the code after yield runs at reset."""
    log: list[str] = []

    @once
    async def get_client() -> AsyncIterator[dict[str, bool]]:
        client = {"open": True}
        log.append("opened")
        yield client
        client["open"] = False
        log.append("closed")

    client = await get_client()
    assert client == {"open": True}
    assert await get_client() is client
    assert log == ["opened"]
    await get_client.reset()
    assert client == {"open": False}
    assert log == ["opened", "closed"]
    assert await get_client() is not client


async def test_a_generator_yields_the_value_and_cleans_up_in_a_worker_thread() -> None:
    """Sync generator: value from yield, cleanup after yield, both off the event loop."""
    loop_thread = threading.get_ident()
    threads: list[int] = []

    @once
    def get_connection() -> Iterator[str]:
        threads.append(threading.get_ident())
        yield "connection"
        threads.append(threading.get_ident())

    assert await get_connection() == "connection"
    await get_connection.reset()
    assert len(threads) == 2
    assert loop_thread not in threads


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_generator_that_does_not_yield_is_an_error(kind: str) -> None:
    """A generator that returns without yielding raises RuntimeError naming it."""

    async def agen() -> AsyncIterator[int]:
        return
        yield  # pragma: no cover

    def gen() -> Iterator[int]:
        return
        yield  # pragma: no cover

    made = once(agen if kind == "async" else gen)
    with pytest.raises(RuntimeError, match="without yielding"):
        await made()


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_generator_that_yields_twice_fails_its_cleanup(kind: str) -> None:
    """Yielding a second time is a RuntimeError at cleanup; the generator is closed anyway."""
    closed: list[bool] = []

    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    def gen() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    made = once(agen if kind == "async" else gen)
    assert await made() == 1
    with pytest.raises(RuntimeError, match="yielded more than once"):
        await made.reset()
    assert closed == [True]


async def test_a_generator_that_fails_before_yield_is_not_cached() -> None:
    """An exception before yield reaches the caller; the next call runs the generator again."""
    attempts = 0

    @once
    async def get_pool() -> AsyncIterator[str]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("no route to host")
        yield "pool"

    with pytest.raises(OSError, match="no route"):
        await get_pool()
    assert await get_pool() == "pool"


async def test_cleanup_runs_exactly_once_even_when_reset_twice() -> None:
    """Reset forgets the value: a second reset has nothing left to clean up."""
    closes = 0

    @once
    async def get_client() -> AsyncIterator[int]:
        nonlocal closes
        yield 1
        closes += 1

    await get_client()
    await get_client.reset()
    await get_client.reset()
    assert closes == 1


async def test_reset_waits_for_an_attempt_in_flight_and_cleans_up_its_value() -> None:
    """reset() during an attempt: the attempt finishes, then its value is cleaned up."""
    gate = anyio.Event()
    log: list[str] = []

    @once
    async def get_client() -> AsyncIterator[str]:
        await gate.wait()
        log.append("open")
        yield "client"
        log.append("close")

    got: list[str] = []

    async def caller() -> None:
        got.append(await get_client())

    async with anyio.create_task_group() as group:
        group.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(get_client.reset)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert got == ["client"]
    assert log == ["open", "close"]


async def test_a_callable_object_with_async_call_is_awaited() -> None:
    """A callable instance whose __call__ is async is treated as async def."""

    class Loader:
        async def __call__(self) -> str:
            return "loaded"

    assert await once(Loader())() == "loaded"


async def test_reset_all_waits_for_attempts_in_flight_and_cleans_up_everything() -> None:
    """reset_all() awaits attempts in flight, then cleans every value of the loop, newest first."""
    from fastapi_once import reset_all

    gate = anyio.Event()
    log: list[str] = []

    @once
    async def first() -> AsyncIterator[str]:
        yield "first"
        log.append("close first")

    @once
    async def slow() -> AsyncIterator[str]:
        await gate.wait()
        yield "slow"
        log.append("close slow")

    await first()
    async with anyio.create_task_group() as group:
        group.start_soon(slow)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(reset_all)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert log == ["close slow", "close first"]


async def test_a_partial_is_called_for_its_kind() -> None:
    """functools.partial of a generator function is still a generator once."""
    import functools

    async def connect(dsn: str) -> AsyncIterator[str]:
        yield dsn

    assert await once(functools.partial(connect, "sqlite://"))() == "sqlite://"


class Service:
    """Methods of every binding, each an async def."""

    @staticmethod
    async def static() -> str:
        return "static"

    @classmethod
    async def klass(cls) -> str:
        return f"class {cls.__name__}"


def _wrapped(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def _hidden(fn: Any) -> Any:
    def wrapper() -> Any:  # no functools.wraps: nothing says it hides an async def
        return fn()

    return wrapper


async def _plain() -> str:
    return "plain"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Service.__dict__["static"], "static"),
        (lambda: Service.klass, "class Service"),
        (lambda: functools.partial(_plain), "plain"),
        (lambda: _wrapped(_plain), "plain"),
        (lambda: _hidden(_plain), "plain"),
    ],
    ids=["staticmethod", "classmethod", "partial", "functools.wraps", "plain-wrapper"],
)
async def test_a_wrapped_async_def_is_awaited(make: Any, expected: str) -> None:
    """staticmethod, classmethod, partial, other wrappers of an async def: its value is awaited."""
    assert await once(make())() == expected
