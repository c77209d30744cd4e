"""The state table of ``fastapi_once._records``, walked row by row on the stored state.

Each test drives one once through a few rows with a fake clock and checks, after each event,
the state its record stores (sub-states included) and what a call gets there.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from sources import Source
from timekeeping import FakeClock, wait_until

from fastapi_once import once
from fastapi_once._keys import NOKEY
from fastapi_once._records import (
    FAILED,
    IDLE,
    READY,
    READY_FAILING,
    READY_STALE,
    REFRESHING,
    REFRESHING_FAILING,
    RUNNING,
    RUNNING_STALE,
)

pytestmark = pytest.mark.anyio


def stored(target: Any) -> str:
    """The state the once's record stores now (idle: no record)."""
    rec = target.store_here().records.get(NOKEY)
    return IDLE if rec is None else str(rec.state)


def looked_at(target: Any, now: float) -> str:
    """The state as an entry point sees it: the time rows applied first."""
    rec = target.store_here().records.get(NOKEY)
    if rec is None:
        return IDLE
    rec.advance(now)
    return stored(target)


async def test_a_failed_refresh_leaves_a_failing_value_whose_next_refresh_serves_past_the_ttl(
    clock: FakeClock,
) -> None:
    """ready -> refreshing -> ready-failing -> refreshing-failing, served past the ttl."""
    source = Source(deaf=True)
    get = once(source.make, refresh=5, ttl=10, stale_if_error=30)
    assert await get() == 1
    assert stored(get) == READY
    clock.advance(6)
    source.failing, source.gate = True, anyio.Event()
    assert await get() == 1  # served; a refresh starts
    assert stored(get) == REFRESHING
    source.gate.set()
    await wait_until(lambda: source.runs == 2 and stored(get) == READY_FAILING)
    source.gate = anyio.Event()
    assert await get() == 1  # a refresh is due again (no cooldown=)
    assert stored(get) == REFRESHING_FAILING
    clock.advance(5)  # past the ttl: a failing value is served until ttl + S
    assert await get() == 1
    assert looked_at(get, clock.now) == REFRESHING_FAILING
    assert (get.status().state, get.status().stale) == ("refreshing", True)
    source.failing = False
    source.gate.set()
    await wait_until(lambda: stored(get) == READY)
    assert await get() == 3


async def test_a_value_past_its_ttl_under_stale_if_error_is_kept_but_not_served(
    clock: FakeClock,
) -> None:
    """ready -> ready-stale (status idle, stale) -> running-stale -> ready-failing."""
    source = Source(deaf=True)
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    assert looked_at(get, clock.now) == READY_STALE
    assert (get.status().state, get.status().stale) == ("idle", True)
    source.failing, source.gate = True, anyio.Event()
    async with anyio.create_task_group() as group:
        got: list[int] = []

        async def call() -> None:
            got.append(await get())

        group.start_soon(call)
        await wait_until(lambda: source.runs == 2)
        assert stored(get) == RUNNING_STALE
        assert (get.status().state, get.status().stale) == ("running", True)
        source.gate.set()
    assert got == [1]  # the waiter gets the value kept
    assert stored(get) == READY_FAILING
    assert await get() == 1  # and later calls too, at once, with one attempt behind
    await wait_until(lambda: source.runs == 3 and stored(get) == READY_FAILING)
    clock.advance(30)  # ttl + S: retired
    assert looked_at(get, clock.now) == IDLE


async def test_a_refresh_that_times_out_is_failing_and_its_value_is_served_past_the_ttl(
    clock: FakeClock,
) -> None:
    """refreshing -> timeout -> refreshing-failing (the run goes on) -> ttl ends: the same."""
    source = Source(deaf=True)
    get = once(source.make, refresh=5, ttl=10, stale_if_error=30, timeout=0.05)
    assert await get() == 1
    clock.advance(6)
    source.gate = anyio.Event()
    assert await get() == 1
    await wait_until(lambda: stored(get) == REFRESHING_FAILING)
    clock.advance(5)
    assert await get() == 1
    assert looked_at(get, clock.now) == REFRESHING_FAILING
    source.gate.set()
    await wait_until(lambda: stored(get) == READY_FAILING)  # its outcome is the timeout


async def test_a_failure_without_a_value_is_failed_during_its_cooldown_then_idle(
    clock: FakeClock,
) -> None:
    """running -> failed (the error at once, no attempt) -> cooldown ends -> idle."""
    source = Source(deaf=True)
    source.failing = True
    get = once(source.make, cooldown=4)
    with pytest.raises(ConnectionError):
        await get()
    assert stored(get) == FAILED
    with pytest.raises(ConnectionError):
        await get()
    assert source.runs == 1
    clock.advance(5)
    assert looked_at(get, clock.now) == IDLE
    source.failing, source.gate = False, anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(get)
        await wait_until(lambda: source.runs == 2)
        assert stored(get) == RUNNING
        source.gate.set()
    assert stored(get) == READY
