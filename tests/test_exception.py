"""Failures are shared by the waiters of one attempt, never cached; every exit path releases."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import traceback
import weakref

import anyio
import pytest
from timekeeping import FakeClock

from fastapi_once import OnceCancelledError, once

pytestmark = pytest.mark.anyio


async def test_every_waiter_gets_the_attempts_own_exception() -> None:
    """200 waiters of one failing attempt get the same exception object, type and message."""
    attempts = 0
    gate = anyio.Event()

    @once
    async def connect() -> None:
        nonlocal attempts
        attempts += 1
        await gate.wait()
        raise ConnectionError(f"database down (attempt {attempts})")

    caught: list[BaseException] = []
    depths: list[int] = []

    async def caller() -> None:
        try:
            await connect()
        except ConnectionError as exc:
            caught.append(exc)
            depths.append(len(traceback.extract_tb(exc.__traceback__)))

    async with anyio.create_task_group() as group:
        for _ in range(200):
            group.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert attempts == 1
    assert len(caught) == 200
    assert all(exc is caught[0] for exc in caught)
    assert str(caught[0]) == "database down (attempt 1)"
    # The traceback is the attempt's own (it reaches into connect) and does not grow with
    # every waiter that re-raises it.
    assert "connect" in [frame.name for frame in traceback.extract_tb(caught[0].__traceback__)]
    assert len(set(depths)) == 1


async def test_a_failure_is_not_cached_the_next_call_tries_again() -> None:
    """After a failed attempt the next call starts a fresh one."""
    attempts = 0

    @once
    async def connect() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("down")
        return "connected"

    with pytest.raises(ConnectionError):
        await connect()
    assert await connect() == "connected"
    assert attempts == 2


async def test_the_failed_attempt_is_forgotten_before_its_waiters_wake() -> None:
    """Waiters that retry the moment they get the error share one fresh attempt."""
    attempts = 0
    gate = anyio.Event()

    @once
    async def connect() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await gate.wait()
            raise ConnectionError("down")
        await anyio.sleep(0.01)
        return "connected"

    results: list[str] = []

    async def caller() -> None:
        try:
            await connect()
        except ConnectionError:
            results.append(await connect())

    async with anyio.create_task_group() as group:
        for _ in range(100):
            group.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert results == ["connected"] * 100
    assert attempts == 2


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
async def test_base_exceptions_release_every_waiter_and_are_not_cached(
    error: type[BaseException],
) -> None:
    """KeyboardInterrupt / SystemExit in fn reach every waiter; the next call retries."""
    attempts = 0
    gate = anyio.Event()

    @once
    async def make() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await gate.wait()
            raise error
        return "made"

    released: list[BaseException] = []

    async def caller() -> None:
        try:
            await make()
        except error as exc:
            released.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert len(released) == 10
    assert await make() == "made"
    assert attempts == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancellation_raised_inside_fn_becomes_an_error_and_is_not_cached() -> None:
    """CancelledError from inside fn: waiters get OnceCancelledError; the next call retries."""
    attempts = 0

    @once
    async def make() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise asyncio.CancelledError
        return "made"

    results = await asyncio.gather(make(), make(), make(), return_exceptions=True)
    assert [type(r) for r in results] == [OnceCancelledError] * 3
    assert isinstance(results[0].__cause__, asyncio.CancelledError)  # type: ignore[union-attr]
    assert "the next call tries again" in str(results[0])
    assert await make() == "made"
    assert attempts == 2


async def test_a_sync_function_that_fails_shares_its_exception() -> None:
    """A def's exception, raised in its worker thread, reaches every waiter unchanged."""

    @once
    def read_config() -> dict[str, str]:
        raise FileNotFoundError("settings.toml")

    with pytest.raises(FileNotFoundError, match=r"settings\.toml"):
        await read_config()


async def test_the_shared_exception_carries_no_callers_context() -> None:
    """Caller A raises it inside an except block; caller B does not see A's exception as context."""
    gate = anyio.Event()

    @once
    async def connect() -> None:
        await gate.wait()
        raise ConnectionError("down")

    seen: dict[str, BaseException | None] = {}

    async def caller_a() -> None:
        try:
            raise KeyError("caller A's own trouble")
        except KeyError:
            try:
                await connect()
            except ConnectionError as exc:
                seen["a"] = exc.__context__

    async def caller_b() -> None:
        await anyio.sleep(0.01)  # raises after A
        try:
            await connect()
        except ConnectionError as exc:
            seen["b"] = exc.__context__

    async with anyio.create_task_group() as group:
        group.start_soon(caller_a)
        group.start_soon(caller_b)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert isinstance(seen["a"], KeyError)
    assert seen["b"] is None


class _Marker:
    pass


async def test_a_failed_requests_frames_are_not_kept_by_the_once() -> None:
    """Without a cooldown nothing of a failure stays: not fn's frames, not the caller's."""
    refs: list[weakref.ref[_Marker]] = []

    @once
    async def load() -> None:
        inside = _Marker()
        refs.append(weakref.ref(inside))
        raise ConnectionError("down")

    async def request() -> None:
        mine = _Marker()
        refs.append(weakref.ref(mine))
        with contextlib.suppress(ConnectionError):
            await load()

    await request()
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    assert load.status().last_error_type == "ConnectionError"


async def test_reset_and_success_release_the_last_error_and_its_frames(clock: FakeClock) -> None:
    """With a cooldown the error is kept until reset() or the next success, then released."""
    refs: list[weakref.ref[_Marker]] = []
    fail = True

    @once(cooldown=30)
    async def load() -> str:
        inside = _Marker()
        refs.append(weakref.ref(inside))
        if fail:
            raise ConnectionError("down")
        return "ok"

    async def request() -> None:
        with contextlib.suppress(ConnectionError):
            await load()

    await request()
    await request()  # fails fast within the cooldown
    await load.reset()
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert load.status().state == "idle"
    await request()
    fail = False
    clock.advance(30)
    assert await load() == "ok"
    gc.collect()
    assert all(ref() is None for ref in refs)
