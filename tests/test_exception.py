"""Failures are shared by the waiters of one attempt, never cached; every exit path releases."""

from __future__ import annotations

import asyncio
import traceback

import anyio
import pytest

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
