"""Where features meet: lifespan, loop end, stale context, bursts, status. Each test is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import trio
from fastapi import FastAPI
from timekeeping import FakeClock, wait_until

from fastapi_once import (
    OnceCycleError,
    OnceLoopWarning,
    OnceTimeoutError,
    once,
    once_lifespan,
    reset_all,
)
from fastapi_once._handles import kick

pytestmark = pytest.mark.anyio


# --- contract 7: the warm-up's own exception is raised as itself, also when a cleanup fails ---


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, ValueError])
async def test_warmup_exception_is_not_masked_by_a_failing_cleanup(
    exc: type[BaseException],
) -> None:
    closed: list[str] = []

    @once
    async def good() -> AsyncIterator[str]:
        yield "good"
        closed.append("good")
        raise RuntimeError("cleanup failed")

    @once
    async def bad() -> str:
        await good()
        raise exc(3)

    app = FastAPI(lifespan=once_lifespan(good, bad, shutdown_timeout=1))
    with anyio.fail_after(5):
        with pytest.raises(BaseException) as info:  # noqa: PT011 - the type is the assertion
            async with app.router.lifespan_context(app):
                raise AssertionError("startup cannot finish")
    assert closed == ["good"]
    assert type(info.value) is exc, repr(info.value)


# --- contract 9: a stale wait-for context in the keeping task --------------------------------


async def test_cleanup_of_a_value_made_inside_another_fn_may_await_that_once() -> None:
    """B made inside A's fn; B's cleanup (on ttl) awaits A, which does not wait for B: no cycle."""
    outcome: list[object] = []
    release_a = anyio.Event()

    @once(ttl=0.05)
    async def b() -> AsyncIterator[int]:
        yield 2
        try:
            with anyio.fail_after(2):
                outcome.append(await a())
        except Exception as exc:
            outcome.append(type(exc).__name__)

    @once
    async def a() -> int:
        await b()
        await release_a.wait()  # A still being made when B's ttl ends
        return 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a)
            await anyio.sleep(0.2)  # B's ttl ends; its cleanup starts and awaits A
            release_a.set()
        await wait_until(lambda: bool(outcome))
    assert outcome == [1], outcome


# --- contract 9: loop end while a value's slow cleanup runs / mid-refresh -------------------


def test_asyncio_run_ending_during_a_slow_ttl_cleanup_does_not_cancel_it() -> None:
    closed: list[str] = []
    errors: list[str] = []

    @once(ttl=0.05)
    async def val() -> AsyncIterator[int]:
        yield 1
        try:
            await asyncio.sleep(0.2)
        except BaseException as exc:
            errors.append(type(exc).__name__)
            raise
        closed.append("done")

    async def main() -> None:
        await val()
        await asyncio.sleep(0.1)  # ttl ended at 0.05: the cleanup is sleeping

    asyncio.run(main())
    assert errors == [], (errors, closed)
    assert closed == ["done"], (errors, closed)


def test_trio_run_ending_during_a_slow_ttl_cleanup_does_not_cancel_it() -> None:
    closed: list[str] = []
    errors: list[str] = []

    @once(ttl=0.05)
    async def val() -> AsyncIterator[int]:
        yield 1
        try:
            await trio.sleep(0.2)
        except BaseException as exc:
            errors.append(type(exc).__name__)
            raise
        closed.append("done")

    async def main() -> None:
        await val()
        await trio.sleep(0.1)

    trio.run(main)
    assert errors == [], (errors, closed)
    assert closed == ["done"], (errors, closed)


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_loop_end_mid_refresh_cleans_old_value_and_the_refresh(runner: str) -> None:
    closed: list[int] = []
    made = 0

    @once(refresh=0.01, ttl=100)
    async def val() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        if n == 2:
            await anyio.sleep(0.05)  # the refresh is mid-way when the loop ends
        yield n
        await anyio.sleep(0.01)
        closed.append(n)

    async def main() -> None:
        assert await val() == 1
        await anyio.sleep(0.02)
        assert await val() == 1  # starts the refresh
        await anyio.sleep(0.001)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnceLoopWarning)
        anyio.run(main, backend=runner)
    assert closed == [1], (closed, made)
    assert made == 2, (closed, made)


# --- reset_all concurrently with a cold burst -------------------------------------------------


async def test_reset_all_during_cold_burst_cleans_everything_exactly_once() -> None:
    made: list[int] = []
    closed: list[int] = []

    @once
    async def val() -> AsyncIterator[int]:
        n = len(made)
        made.append(n)
        await anyio.sleep(0.01)
        yield n
        await anyio.sleep(0.005)
        closed.append(n)

    async def caller() -> None:
        for _ in range(5):
            await val()
            await anyio.sleep(0.003)

    async def resetter() -> None:
        for _ in range(5):
            await reset_all()
            await anyio.sleep(0.004)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(caller)
            tg.start_soon(resetter)
            tg.start_soon(resetter)
        await reset_all()
    assert sorted(closed) == sorted(made), (made, closed)
    assert len(closed) == len(set(closed))


# --- kick during a refresh / during running -----------------------------------------------


async def test_kick_during_refresh_and_running_starts_nothing(clock: FakeClock) -> None:
    gate = anyio.Event()
    made = 0

    @once(refresh=5, ttl=10)
    async def val() -> int:
        nonlocal made
        made += 1
        if made >= 2:
            await gate.wait()
        return made

    with anyio.fail_after(5):
        assert await val() == 1
        clock.advance(6)
        assert await val() == 1
        assert val.status().state == "refreshing"
        assert kick(val, None) is False
        clock.advance(5)  # expired while refreshing: running
        assert val.status().state == "running"
        assert kick(val, None) is False
        gate.set()
        assert await val() == 2
    assert made == 2


# --- timeout x refresh: the old value stays, cooldown honoured, the partial generator closed --


async def test_refresh_timeout_keeps_old_value_and_closes_the_partial_generator(
    clock: FakeClock,
) -> None:
    closed: list[str] = []
    made = 0

    @once(refresh=5, ttl=100, timeout=0.05, cooldown=30)
    async def val() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        try:
            if n == 2:
                await anyio.sleep(1)
            yield n
        finally:
            closed.append(f"v{n}")

    with anyio.fail_after(5):
        assert await val() == 1
        clock.advance(6)
        assert await val() == 1  # refresh starts, will time out
        await wait_until(lambda: "v2" in closed)
        assert val.status().state == "ready"
        assert val.status().last_error_type == "OnceTimeoutError"
        clock.advance(1)
        assert await val() == 1  # within cooldown: no refresh
        assert made == 2
        clock.advance(30)
        assert await val() == 1  # cooldown over: a refresh starts
        await wait_until(lambda: made == 3)
        await anyio.sleep(0.01)
        assert await val() == 3
        await reset_all()
    assert sorted(closed) == ["v1", "v2", "v3"]


# --- key None ----------------------------------------------------------------------------------


async def test_key_none_refresh_ttl_reset_and_status(clock: FakeClock) -> None:
    closed: list[Any] = []
    made: list[Any] = []

    @once(key=lambda k: k, ttl=10, refresh=5)
    async def val(k: Any) -> AsyncIterator[Any]:
        made.append(k)
        yield (k, len(made))
        closed.append(k)

    with anyio.fail_after(5):
        assert await val(None) == (None, 1)
        assert await val(None) == (None, 1)
        assert await val("x") == ("x", 2)
        assert val.status().keys == {"ready": 2, "refreshing": 0, "running": 0, "failed": 0}
        await val.reset(None)
        assert closed == [None]
        assert val.status().size == 1
        assert await val(None) == (None, 3)
        clock.advance(11)
        assert val.status().state == "idle"
        await reset_all()
    assert sorted(map(str, closed)) == ["None", "None", "x"]


# --- callers cancelled at every await point ---------------------------------------------------


@pytest.mark.parametrize("at", [0.0, 0.005, 0.015, 0.025])
async def test_cancelled_callers_never_restart_or_cancel_shared_work(at: float) -> None:
    runs = 0
    closed: list[int] = []

    @once(retries=1, backoff=0.01)
    async def val() -> AsyncIterator[int]:
        nonlocal runs
        runs += 1
        await anyio.sleep(0.01)
        if runs == 1:
            raise ConnectionError
        yield runs
        closed.append(runs)

    with anyio.fail_after(5):
        for _ in range(3):
            with anyio.move_on_after(at):
                await val()
        await wait_until(lambda: val.status().state == "ready")
        assert await val() == 2
        await reset_all()
    assert runs == 2
    assert closed == [2]


# --- a generator whose cleanup raises -------------------------------------------------------


async def test_cleanup_error_raised_once_and_cleanup_runs_once(clock: FakeClock) -> None:
    runs: list[int] = []
    made = 0

    @once(refresh=5, ttl=10)
    async def val() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        yield n
        runs.append(n)
        raise RuntimeError(f"cleanup {n}")

    with anyio.fail_after(5):
        assert await val() == 1
        clock.advance(6)
        await val()  # refresh: value 1 replaced; its cleanup raises in its keeper
        await wait_until(lambda: runs == [1])
        with pytest.raises(RuntimeError, match="cleanup 2"):
            await val.reset()
        await val.reset()  # nothing left to raise
    assert runs == [1, 2]


# --- nested onces with cleanups -------------------------------------------------------------


async def test_nested_onces_reset_all_cleans_outer_before_inner() -> None:
    order: list[str] = []

    @once
    async def inner() -> AsyncIterator[dict[str, bool]]:
        box = {"open": True}
        yield box
        box["open"] = False
        order.append("inner")

    @once
    async def outer() -> AsyncIterator[str]:
        box = await inner()
        yield "outer"
        assert box["open"], "outer's cleanup found inner already closed"
        order.append("outer")

    with anyio.fail_after(5):
        await outer()
        await reset_all()
    assert order == ["outer", "inner"]


# --- status consistency in every state -----------------------------------------------------


async def test_status_matches_the_next_call_in_every_state(clock: FakeClock) -> None:
    gate = anyio.Event()
    fail = False
    made = 0

    @once(refresh=5, ttl=10, cooldown=3)
    async def val() -> int:
        nonlocal made
        made += 1
        if fail:
            raise ValueError("no")
        await gate.wait()
        return made

    with anyio.fail_after(5):
        assert val.status().state == "idle"
        async with anyio.create_task_group() as tg:
            tg.start_soon(val)
            await anyio.sleep(0.01)
            assert val.status().state == "running"
            gate.set()
        assert val.status().state == "ready"
        clock.advance(6)
        gate = anyio.Event()
        assert await val() == 1
        assert val.status().state == "refreshing"
        gate.set()
        await wait_until(lambda: val.status().made_at is not None and made == 2)
        await anyio.sleep(0.01)
        assert val.status().state == "ready"
        assert await val() == 2
        clock.advance(11)
        assert val.status().state == "idle"
        fail = True
        with pytest.raises(ValueError, match="no"):
            await val()
        assert val.status().state == "failed"
        with pytest.raises(ValueError, match="no"):
            await val()
        assert made == 3
        clock.advance(4)
        st = val.status()
        assert st.state in ("idle", "failed")
        with pytest.raises(ValueError, match="no"):
            await val()
        assert made == 4


async def test_timeout_bounds_a_sub_dependency_wait() -> None:
    @once
    async def sub() -> int:
        await anyio.sleep(1)
        return 1

    @once(timeout=0.05)
    async def top() -> int:
        return await sub() + 1

    with anyio.fail_after(5):
        with pytest.raises(OnceTimeoutError):
            await top()
        assert await sub() == 1  # the shared sub-dependency kept running


async def test_reset_inside_fn_of_another_once_waiting_on_me_raises_cycle() -> None:
    @once
    async def a() -> int:
        return await b()

    @once
    async def b() -> int:
        await a.reset()
        return 1

    with anyio.fail_after(5), pytest.raises(OnceCycleError):
        await a()
