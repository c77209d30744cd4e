"""reset() and reset_all(): every retired value's cleanup has run when they return."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceCycleError, once, reset_all

pytestmark = pytest.mark.anyio


async def test_reset_during_a_refresh_returns_after_both_cleanups_ran(clock: FakeClock) -> None:
    """The replaced value and the refreshed one are both cleaned up before reset() returns."""
    closed: list[int] = []
    release = anyio.Event()
    made = 0

    @once(refresh=5)
    async def load() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        if n == 2:
            await release.wait()
        yield n
        await anyio.sleep(0.01)  # a cleanup that takes a while
        closed.append(n)

    assert await load() == 1
    clock.advance(6)
    assert await load() == 1  # starts the refresh
    assert load.status().state == "refreshing"
    async with anyio.create_task_group() as group:
        group.start_soon(load.reset)
        await anyio.sleep(0.01)
        release.set()
    assert sorted(closed) == [1, 2]
    assert load.status().state == "idle"


async def test_reset_all_waits_for_the_slow_cleanup_of_a_value_retired_by_ttl(
    clock: FakeClock,
) -> None:
    """A value that expired before reset_all() has its (slow) cleanup finished when it returns."""
    closed: list[int] = []
    made = 0

    @once(ttl=10)
    async def load() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        yield n
        await anyio.sleep(0.05)
        closed.append(n)

    assert await load() == 1
    clock.advance(11)
    assert await load() == 2  # value 1 retired by its ttl; its cleanup is now running
    await reset_all()
    assert sorted(closed) == [1, 2]


async def test_reset_from_inside_the_onces_own_function_raises_instead_of_hanging() -> None:
    """reset() inside fn would wait for itself: it raises OnceCycleError naming the once."""

    @once(name="app.db")
    async def db() -> int:
        await db.reset()
        return 1

    with anyio.fail_after(5), pytest.raises(OnceCycleError, match=r"app\.db\.reset\(\)"):
        await db()


async def test_reset_all_through_another_once_raises_instead_of_hanging() -> None:
    """reset_all() in a once that another once's fn awaits would wait for both: it raises."""

    @once(name="app.inner")
    async def inner() -> int:
        await reset_all()
        return 1

    @once(name="app.outer")
    async def outer() -> int:
        return await inner() + 1

    with anyio.fail_after(5), pytest.raises(OnceCycleError, match="reset_all"):
        await outer()
    assert outer.status().state == "failed"


async def test_reset_forgets_the_last_error_and_status_says_idle() -> None:
    """After reset() status() says idle, with no last error; the counters are kept."""

    @once
    async def load() -> int:
        raise ConnectionError("db down")

    with pytest.raises(ConnectionError):
        await load()
    assert load.status().state == "failed"
    await load.reset()
    status = load.status()
    assert status.state == "idle"
    assert status.last_error_type is None
    assert status.attempts == 1  # counters are not zeroed


async def test_reset_all_repeats_until_values_made_meanwhile_are_cleaned_up() -> None:
    """Work in flight when reset_all() starts is awaited, and what it made is cleaned up too."""
    closed: list[str] = []
    gate = anyio.Event()

    @once
    async def slow() -> AsyncIterator[str]:
        await gate.wait()
        yield "slow"
        closed.append("slow")

    @once
    async def quick() -> AsyncIterator[str]:
        await slow()
        yield "quick"
        closed.append("quick")

    async with anyio.create_task_group() as group:
        group.start_soon(quick)
        await wait_until(lambda: quick.status().state == "running")
        group.start_soon(reset_all)
        await anyio.sleep(0.01)
        gate.set()
    assert sorted(closed) == ["quick", "slow"]
    assert quick.status().state == "idle"
    assert slow.status().state == "idle"
