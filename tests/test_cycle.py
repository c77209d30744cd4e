"""A once that waits for itself, directly or through others, raises instead of deadlocking."""

from __future__ import annotations

import anyio
import pytest
from fastapi import Depends

from fastapi_once import OnceCycleError, once

pytestmark = pytest.mark.anyio


async def test_a_once_that_awaits_itself_raises_a_cycle_error() -> None:
    """Direct re-entrancy names the once twice."""

    @once
    async def config() -> int:
        return await config() + 1

    with anyio.fail_after(5), pytest.raises(OnceCycleError) as info:
        await config()
    assert info.value.cycle == (config.name, config.name)
    assert "config -> " in str(info.value)


async def test_a_cycle_through_other_onces_is_named() -> None:
    """a -> b -> a is reported with both names, in order."""

    @once
    async def a() -> int:
        return await b()

    @once
    async def b() -> int:
        return await a()

    with anyio.fail_after(5), pytest.raises(OnceCycleError) as info:
        await a()
    assert info.value.cycle == (a.name, b.name, a.name)


async def test_a_cycle_through_sub_dependencies_is_detected() -> None:
    """A once whose Depends() chain leads back to itself raises a cycle error."""

    async def settings() -> str:
        return await db()

    @once
    async def db(s: str = Depends(settings)) -> str:
        return s

    with anyio.fail_after(5), pytest.raises(OnceCycleError):
        await db()


async def test_a_cycle_started_by_two_different_callers_is_detected() -> None:
    """a (started by one caller) waits for b, b (started by another) waits for a: no deadlock."""
    gate_a = anyio.Event()
    gate_b = anyio.Event()

    @once
    async def a() -> int:
        await gate_a.wait()
        return await b()

    @once
    async def b() -> int:
        await gate_b.wait()
        return await a()

    errors: list[BaseException] = []

    async def call(o: object) -> None:
        try:
            await o()  # type: ignore[operator]
        except OnceCycleError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(call, a)
            group.start_soon(call, b)
            await anyio.wait_all_tasks_blocked()
            gate_a.set()
            await anyio.wait_all_tasks_blocked()
            gate_b.set()
    assert len(errors) == 2


async def test_waiting_for_another_once_is_not_a_cycle() -> None:
    """Onces that depend on each other without a loop resolve normally, concurrently."""

    @once
    async def settings() -> str:
        await anyio.sleep(0.01)
        return "s"

    @once
    async def db() -> str:
        return f"db({await settings()})"

    @once
    async def cache() -> str:
        return f"cache({await settings()}, {await db()})"

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(cache)
            group.start_soon(db)
    assert await cache() == "cache(s, db(s))"
