"""Where features meet: timed-out sync generators at teardown, reset of another once, eviction."""

from __future__ import annotations

import time
import warnings
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from fastapi import FastAPI
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceLoopWarning, OnceTimeoutError, once, once_lifespan, reset_all

pytestmark = pytest.mark.anyio


async def test_lifespan_shutdown_returns_after_a_timed_out_sync_generator_is_closed() -> None:
    closed: list[int] = []

    @once(timeout=0.05)
    def gen() -> Iterator[int]:
        time.sleep(0.3)
        yield 1
        closed.append(1)

    app = FastAPI(lifespan=once_lifespan(shutdown_timeout=2))
    with anyio.fail_after(5):
        async with app.router.lifespan_context(app):
            with pytest.raises(OnceTimeoutError):
                await gen()
        at_shutdown = list(closed)
        await wait_until(lambda: closed == [1])
    assert at_shutdown == [1], "shutdown returned before the late value was closed"


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_loop_end_with_a_timed_out_sync_generator_still_closes_it(runner: str) -> None:
    closed: list[int] = []

    @once(timeout=0.05)
    def gen() -> Iterator[int]:
        time.sleep(0.3)
        yield 1
        closed.append(1)

    async def main() -> None:
        with pytest.raises(OnceTimeoutError):
            await gen()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnceLoopWarning)
        anyio.run(main, backend=runner)
    deadline = time.monotonic() + 2
    while not closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closed == [1]


async def test_reset_of_another_once_whose_refresh_waits_on_me_raises(clock: FakeClock) -> None:
    made = 0

    @once(refresh=5, ttl=100)
    async def b() -> int:
        nonlocal made
        made += 1
        if made >= 2:
            return await a() + 10
        return made

    @once
    async def a() -> int:
        await b.reset()
        return 1

    with anyio.fail_after(5):
        assert await b() == 1
        clock.advance(6)
        assert await b() == 1  # B's refresh starts and awaits A, whose fn resets B
        await wait_until(lambda: b.status().state == "ready" and made == 2)
        await anyio.sleep(0.01)
        assert a.status().last_error_type == "OnceCycleError"


async def test_fn_resets_another_once_with_slow_cleanup_waits_for_it() -> None:
    closed: list[str] = []

    @once
    async def b() -> AsyncIterator[str]:
        yield "b"
        await anyio.sleep(0.05)
        closed.append("b")

    @once
    async def a() -> str:
        await b.reset()
        return "a:" + ",".join(closed)

    with anyio.fail_after(5):
        await b()
        assert await a() == "a:b"


async def test_eviction_of_a_failed_key_drops_its_cooldown() -> None:
    """maxsize=1: key x fails with cooldown; y is made; x's cooldown is gone (LRU drop).

    The state table says "any | eviction -> idle", so this documents the behaviour: held.
    """
    runs: list[str] = []

    @once(key=lambda k: k, maxsize=1, cooldown=100)
    async def val(k: str) -> str:
        runs.append(k)
        if k == "x":
            raise ValueError("x down")
        return k

    with anyio.fail_after(5):
        with pytest.raises(ValueError, match="x down"):
            await val("x")
        assert await val("y") == "y"
        with pytest.raises(ValueError, match="x down"):
            await val("x")  # within x's cooldown, but x was evicted: a new attempt
    assert runs.count("x") == 2, runs  # by the table: eviction forgets the failure


async def test_ttl_expiry_during_refresh_with_eviction_and_cooldown(clock: FakeClock) -> None:
    release = anyio.Event()
    made: list[str] = []
    closed: list[str] = []

    @once(key=lambda k: k, maxsize=1, ttl=10, refresh=5, cooldown=3)
    async def val(k: str) -> AsyncIterator[str]:
        made.append(k)
        n = f"{k}{made.count(k)}"
        if n == "a2":
            await release.wait()
        yield n
        closed.append(n)

    with anyio.fail_after(5):
        assert await val("a") == "a1"
        clock.advance(6)
        assert await val("a") == "a1"  # refresh of a starts
        assert await val("b") == "b1"  # over maxsize: a is in flight, not evictable; b kept?
        clock.advance(5)  # a1 expired during its refresh
        async with anyio.create_task_group() as tg:
            got: list[str] = []

            async def join() -> None:
                got.append(await val("a"))

            tg.start_soon(join)
            await anyio.sleep(0.01)
            release.set()
        assert got == ["a2"]
        await reset_all()
    assert sorted(closed) == sorted(["a1", "a2", "b1"]), closed
    assert made.count("a") == 2


async def test_reset_during_refresh_that_times_out(clock: FakeClock) -> None:
    closed: list[str] = []
    made = 0

    @once(refresh=5, ttl=100, timeout=0.1)
    async def val() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        try:
            if n == 2:
                await anyio.sleep(5)
            yield n
        finally:
            closed.append(f"v{n}")

    with anyio.fail_after(5):
        assert await val() == 1
        clock.advance(6)
        assert await val() == 1
        await val.reset()
    assert sorted(closed) == ["v1", "v2"]


async def test_reset_all_while_values_expire_and_refresh_in_keyed_once(clock: FakeClock) -> None:
    closed: list[str] = []
    made: list[str] = []
    gate = anyio.Event()

    @once(key=lambda k: k, ttl=10, refresh=5, maxsize=3)
    async def val(k: int) -> AsyncIterator[str]:
        n = f"{k}.{len(made)}"
        made.append(n)
        if len(made) > 3:
            await gate.wait()
        yield n
        await anyio.sleep(0.005)
        closed.append(n)

    with anyio.fail_after(5):
        for k in range(3):
            await val(k)
        clock.advance(6)
        for k in range(3):
            await val(k)  # refreshes start where kept
        clock.advance(5)  # every value expired while its refresh runs
        assert val.status().keys == {"ready": 0, "refreshing": 0, "running": 3, "failed": 0}
        async with anyio.create_task_group() as tg:
            tg.start_soon(reset_all)
            await anyio.sleep(0.01)
            gate.set()
    assert sorted(closed) == sorted(made), (made, closed)
