"""Cancelling callers never cancels or restarts the shared work."""

from __future__ import annotations

import anyio
import pytest

from fastapi_once import once

pytestmark = pytest.mark.anyio

CANCEL_POINTS = ["before_the_work_starts", "while_the_work_runs", "as_the_work_finishes"]


@pytest.mark.parametrize("cancel_at", CANCEL_POINTS)
async def test_cancelling_the_first_caller_keeps_the_shared_work(cancel_at: str) -> None:
    """The caller that started the work leaves; the work goes on and the others get its value."""
    runs = 0
    work_cancelled = False
    started = anyio.Event()
    gate = anyio.Event()
    value = object()
    first_scope = anyio.CancelScope()

    @once
    async def load_model() -> object:
        nonlocal runs, work_cancelled
        runs += 1
        started.set()
        try:
            await gate.wait()
        except anyio.get_cancelled_exc_class():
            work_cancelled = True
            raise
        if cancel_at == "as_the_work_finishes":
            first_scope.cancel()
        return value

    first_result: list[object] = []
    others: list[object] = []

    async def first_caller() -> None:
        with first_scope:
            if cancel_at == "before_the_work_starts":
                first_scope.cancel()
            first_result.append(await load_model())

    async def other_caller() -> None:
        others.append(await load_model())

    async with anyio.create_task_group() as group:
        group.start_soon(first_caller)
        await started.wait()
        if cancel_at == "while_the_work_runs":
            first_scope.cancel()
        for _ in range(50):
            group.start_soon(other_caller)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert others == [value] * 50
    assert first_result in ([], [value])
    if cancel_at != "as_the_work_finishes":
        assert first_result == []
    assert not work_cancelled
    assert await load_model() is value
    assert runs == 1


async def test_when_every_caller_has_left_the_work_still_finishes_and_is_kept() -> None:
    """All callers cancelled mid-work: the work completes and the next call gets its value."""
    runs = 0
    gate = anyio.Event()
    finished = anyio.Event()

    @once
    async def load_model() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        finished.set()
        return "model"

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(load_model)
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    gate.set()
    await finished.wait()
    assert await load_model() == "model"
    assert runs == 1


async def test_a_waiter_cancelled_mid_wait_does_not_disturb_the_other_waiters() -> None:
    """Waiters leave one by one; those that stay all get the value."""
    gate = anyio.Event()

    @once
    async def make() -> int:
        await gate.wait()
        return 42

    kept: list[int] = []

    async def leaver() -> None:
        with anyio.move_on_after(0.01):
            await make()

    async def stayer() -> None:
        kept.append(await make())

    async with anyio.create_task_group() as group:
        for i in range(40):
            group.start_soon(leaver if i % 2 else stayer)
        await anyio.sleep(0.05)
        gate.set()
    assert kept == [42] * 20


async def test_a_caller_with_a_deadline_gets_its_own_timeout_not_a_restart() -> None:
    """A caller's own deadline cancels only its wait; the attempt is not restarted."""
    runs = 0
    gate = anyio.Event()

    @once
    async def make() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return runs

    with anyio.move_on_after(0.01) as scope:
        await make()
    assert scope.cancelled_caught
    gate.set()
    assert await make() == 1
    assert runs == 1
