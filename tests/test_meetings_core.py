"""Where features meet: timeouts, eviction, reset inside work, cleanups. Each test is bounded."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceCycleError, OnceTimeoutError, once, reset_all

pytestmark = pytest.mark.anyio


# --- contract 6: reset from a generator's cleanup (the fn's own code after yield) -------------


async def test_reset_from_own_cleanup_does_not_hang(clock: FakeClock) -> None:
    """The code after yield is the once's own fn: reset() there must not wait for itself."""
    closed: list[int] = []
    outcome: list[object] = []

    @once
    async def res() -> AsyncIterator[int]:
        yield 1
        with anyio.move_on_after(1) as inner:  # bounds the hang so the test can finish
            try:
                await res.reset()
                outcome.append("returned")
            except Exception as exc:
                outcome.append(type(exc).__name__)
        if inner.cancelled_caught:
            outcome.append("hung for 1 s")
        closed.append(1)

    assert await res() == 1
    with anyio.fail_after(5):
        await res.reset()
    assert closed == [1]
    assert outcome in (["OnceCycleError"], ["returned"]), outcome


async def test_reset_all_from_own_cleanup_does_not_hang() -> None:
    closed: list[int] = []
    outcome: list[object] = []

    @once
    async def res() -> AsyncIterator[int]:
        yield 1
        with anyio.move_on_after(1) as inner:
            try:
                await reset_all()
                outcome.append("returned")
            except Exception as exc:
                outcome.append(type(exc).__name__)
        if inner.cancelled_caught:
            outcome.append("hung for 1 s")
        closed.append(1)

    assert await res() == 1
    with anyio.fail_after(5):
        await reset_all()
    assert closed == [1]
    assert outcome in (["OnceCycleError"], ["returned"]), outcome


async def test_reset_of_another_once_whose_cleanup_awaits_me_does_not_hang() -> None:
    """A's fn resets B; B's cleanup awaits A (being made): a cycle through another once."""
    outcome: list[object] = []

    @once
    async def a() -> int:
        await b.reset()
        return 1

    @once
    async def b() -> AsyncIterator[int]:
        yield 2
        with anyio.move_on_after(1) as inner:
            try:
                await a()
                outcome.append("returned")
            except Exception as exc:
                outcome.append(type(exc).__name__)
        if inner.cancelled_caught:
            outcome.append("hung for 1 s")

    assert await b() == 2  # B made outside A
    with anyio.fail_after(5):
        with contextlib.suppress(OnceCycleError):
            await a()
    assert outcome == ["OnceCycleError"], outcome


# --- maxsize under concurrent keys -----------------------------------------------------------


async def test_maxsize_1_concurrent_keys_value_handed_out_is_not_already_cleaned_up() -> None:
    """Two keys made concurrently with maxsize=1: what a caller receives must still be open."""
    closed: list[str] = []
    gate = anyio.Event()

    @once(key=lambda k: k, maxsize=1)
    async def conn(k: str) -> AsyncIterator[dict[str, bool]]:
        await gate.wait()
        box = {"open": True}
        yield box
        box["open"] = False
        closed.append(k)

    states: dict[str, bool] = {}

    async def call(k: str) -> None:
        box = await conn(k)
        states[k] = box["open"]  # as handed out, before anything else runs

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a")
            tg.start_soon(call, "b")
            await anyio.sleep(0.05)
            gate.set()
        await reset_all()
    assert sorted(closed) == ["a", "b"]
    # each caller must receive a value that is still open (not already cleaned up)
    assert states == {"a": True, "b": True}, states


# --- contract 1: a timed-out attempt that does not stop; a second call starts another run ------


async def test_timeout_then_next_call_never_two_runs_in_flight_async_shielded() -> None:
    running = 0
    peak = 0

    @once(timeout=0.05)
    async def slow() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.3)
        finally:
            running -= 1
        return 1

    with anyio.fail_after(5):
        with pytest.raises(OnceTimeoutError):
            await slow()
        with pytest.raises(OnceTimeoutError):
            await slow()
        await anyio.sleep(0.4)
    assert peak == 1


async def test_timeout_then_next_call_never_two_runs_in_flight_sync_def() -> None:
    running = 0
    peak = 0

    @once(timeout=0.05)
    def slow() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        time.sleep(0.3)
        running -= 1
        return 1

    with anyio.fail_after(5):
        with pytest.raises(OnceTimeoutError):
            await slow()
        with pytest.raises(OnceTimeoutError):
            await slow()
        await anyio.sleep(0.5)
    assert peak == 1


# --- contract 8: a sync generator that yields after its attempt timed out is closed -----------


async def test_sync_generator_yielding_after_timeout_is_closed_before_reset_all_returns() -> None:
    closed: list[int] = []

    @once(timeout=0.05)
    def gen() -> Iterator[int]:
        time.sleep(0.3)
        yield 1
        closed.append(1)

    with anyio.fail_after(5):
        with pytest.raises(OnceTimeoutError):
            await gen()
        await reset_all()
        at_return = list(closed)
        await wait_until(lambda: closed == [1])
    assert closed == [1]
    assert at_return == [1], "reset_all() returned while a made value was not yet closed"


# --- contract 9: a cancelled reset_all leaves no value un-cleaned ----------------------------


async def test_cancelled_reset_all_still_cleans_every_value() -> None:
    closed: list[str] = []

    @once
    async def first() -> AsyncIterator[str]:
        yield "first"
        closed.append("first")

    @once
    async def second() -> AsyncIterator[str]:
        yield "second"
        await anyio.sleep(0.2)  # slow cleanup
        closed.append("second")

    await first()
    await second()  # newest: cleaned first
    with anyio.fail_after(5):
        with anyio.move_on_after(0.05):
            await reset_all()
        assert first.status().state == "idle"  # out of service
        await anyio.sleep(0.5)
    assert sorted(closed) == ["first", "second"]


# --- contract 2: a failed refresh's cooldown, whether or not a call saw the expiry -----------


@pytest.mark.parametrize("observed", [True, False])
async def test_failed_refresh_after_expiry_cooldown_same_whether_observed(
    clock: FakeClock, observed: bool
) -> None:
    release = anyio.Event()
    made = 0

    @once(ttl=10, refresh=5, cooldown=100)
    async def val() -> int:
        nonlocal made
        made += 1
        if made == 2:
            await release.wait()
            raise ValueError("refresh failed")
        return made

    with anyio.fail_after(5):
        assert await val() == 1
        clock.advance(6)
        assert await val() == 1  # starts the refresh
        clock.advance(5)  # value expired during the refresh
        if observed:
            async with anyio.create_task_group() as tg:

                async def join() -> None:
                    with pytest.raises(ValueError, match="refresh failed"):
                        await val()

                tg.start_soon(join)
                await anyio.sleep(0.01)
                release.set()
        else:
            release.set()
            await wait_until(lambda: val.status().attempts == 2 and made == 2)
            await anyio.sleep(0.01)
        clock.advance(1)
        # within the cooldown of the failed attempt: fail fast, no new run
        with pytest.raises(ValueError, match="refresh failed"):
            await val()
    assert made == 2


# --- memory: retired values are remembered forever ---------------------------------------------


async def test_retired_list_does_not_grow_without_bound(clock: FakeClock) -> None:
    @once(ttl=1)
    async def val() -> AsyncIterator[int]:
        yield 1

    with anyio.fail_after(10):
        for _ in range(200):
            await val()
            clock.advance(2)
        await val()
        await anyio.sleep(0.05)
    store = val.store_seen()
    assert store is not None
    assert len(store.retired) < 10, len(store.retired)


async def test_maxsize_1_value_made_while_another_key_in_flight_is_kept() -> None:
    """maxsize=1: a key made while another key is still being made is evicted at birth."""
    closed: list[str] = []
    runs: list[str] = []
    gates = {"a": anyio.Event(), "b": anyio.Event()}

    @once(key=lambda k: k, maxsize=1)
    async def conn(k: str) -> AsyncIterator[dict[str, bool]]:
        runs.append(k)
        await gates[k].wait()
        box = {"open": True}
        yield box
        box["open"] = False
        closed.append(k)

    seen: dict[str, bool] = {}

    async def call_a() -> None:
        box = await conn("a")
        seen["a"] = box["open"]

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn, "b")  # b in flight, not yet made
            await anyio.sleep(0.01)
            tg.start_soon(call_a)
            await anyio.sleep(0.01)
            gates["a"].set()
            await anyio.sleep(0.05)
            size = conn.status().size
            gates["b"].set()
        await reset_all()
    assert seen == {"a": True}, (seen, closed, size)
    assert size == 1, size
