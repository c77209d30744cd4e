"""stale_if_error=: a value past its ttl is served a while longer when making a new one fails."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from crowd import crowd
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from sources import Source
from timekeeping import FakeClock, wait_until

from fastapi_once import once, readiness_router

pytestmark = pytest.mark.anyio


def at_once(call: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``call()`` and return its result, asserting that it never suspends (no waiting)."""
    coro = call()
    with pytest.raises(StopIteration) as returned:
        coro.send(None)  # type: ignore[attr-defined]
    return returned.value.value


async def test_a_failed_attempt_past_the_ttl_gives_its_waiters_the_old_value(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Within the window, the callers that waited on a failed attempt get the old value."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    source.gate = anyio.Event()
    async with anyio.create_task_group() as group:
        results: list[int] = []

        async def call() -> None:
            results.append(await get())

        for _ in range(10):
            group.start_soon(call)
        await wait_until(lambda: get.status().joins >= 9)
        source.gate.set()
    assert results == [1] * 10
    assert "failed after" in caplog.text
    assert "serving the stale value (stale_if_error=)" in caplog.text
    assert "run 2 failed" not in caplog.text  # the message is not logged: it may hold secrets
    assert source.runs == 2  # one attempt for all of them
    assert source.closed == []  # the old value is still in service
    status = get.status()
    assert (status.state, status.stale, status.last_error_type) == (
        "ready",
        True,
        "ConnectionError",
    )


async def test_after_a_failure_later_calls_get_the_old_value_at_once_with_one_attempt_behind(
    clock: FakeClock,
) -> None:
    """Stale and failing: calls return without waiting; at most one attempt runs at a time."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    assert await get() == 1  # waited for run 2, which failed
    source.gate = anyio.Event()
    for _ in range(50):
        assert at_once(get) == 1
    await wait_until(lambda: source.runs == 3)
    assert get.status().state == "refreshing"
    source.gate.set()
    await wait_until(lambda: get.status().state == "ready")
    assert source.most == 1
    assert source.runs == 3


async def test_past_the_window_the_old_value_is_cleaned_up_and_the_failure_reaches_callers(
    clock: FakeClock,
) -> None:
    """At ttl + stale_if_error the old value is retired once; the next failure is raised."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    assert await get() == 1
    await wait_until(lambda: get.status().state == "ready")
    clock.advance(30)  # 41 s after it was made: past the window
    with pytest.raises(ConnectionError, match="failed"):
        await get()
    await wait_until(lambda: source.closed == [1])
    status = get.status()
    assert (status.state, status.stale, status.stale_until) == ("failed", False, None)
    with pytest.raises(ConnectionError):
        await get()
    assert source.closed == [1]


async def test_a_success_within_the_window_replaces_the_value_and_cleans_the_old_one_up_once(
    clock: FakeClock,
) -> None:
    """A later attempt that succeeds is served; the stale value's cleanup runs exactly once."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    assert await get() == 1
    source.failing = False
    assert at_once(get) == 1  # serves the stale value, starts run 3 in the background
    await wait_until(lambda: source.closed == [1])
    assert await get() == 3
    status = get.status()
    assert (status.state, status.stale) == ("ready", False)
    clock.advance(5)
    assert await get() == 3
    assert source.closed == [1]


async def test_past_the_ttl_the_first_call_waits_for_a_new_value_when_nothing_failed(
    clock: FakeClock,
) -> None:
    """Without a failure, the stale value is not served: the call waits and gets the new one."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    status = get.status()
    assert (status.state, status.stale) == ("idle", True)  # not served: a call starts an attempt
    results = await crowd(get, 10)
    assert results == [2] * 10
    await wait_until(lambda: source.closed == [1])


async def test_reset_during_the_window_cleans_the_stale_value_up(clock: FakeClock) -> None:
    """reset() while a stale value is served retires it (cleanup once); the next call makes anew."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    assert await get() == 1
    await wait_until(lambda: get.status().state == "ready")
    await get.reset()
    assert source.closed == [1]
    assert get.status().state == "idle"
    with pytest.raises(ConnectionError):
        await get()  # nothing stale left to serve
    assert source.closed == [1]


async def test_eviction_during_the_window_cleans_the_stale_value_up(clock: FakeClock) -> None:
    """A stale value evicted by a newer key is cleaned up once, like any value."""
    closed: list[str] = []
    failing: set[str] = set()

    @once(key=lambda k: k, maxsize=1, ttl=10, stale_if_error=30)
    async def get(k: str) -> AsyncIterator[str]:
        if k in failing:
            raise ConnectionError(k)
        yield k
        closed.append(k)

    assert await get("a") == "a"
    clock.advance(11)
    failing.add("a")
    assert await get("a") == "a"  # stale
    assert await get("b") == "b"  # evicts a
    await wait_until(lambda: closed == ["a"])
    with pytest.raises(ConnectionError):
        await get("a")


async def test_a_keyed_once_keeps_a_stale_value_per_key_none_included(clock: FakeClock) -> None:
    """Each key (None too) has its own stale value and window."""
    failing: set[object] = set()
    runs: list[object] = []

    @once(key=lambda k: k, ttl=10, stale_if_error=30)
    async def get(k: object) -> str:
        runs.append(k)
        if k in failing:
            raise ConnectionError(repr(k))
        return f"{k} #{runs.count(k)}"

    assert await get(None) == "None #1"
    clock.advance(5)
    assert await get("a") == "a #1"
    clock.advance(6)  # None is past its ttl, "a" is not
    failing.update({None, "a"})
    assert await get(None) == "None #1"
    assert await get("a") == "a #1"
    status = get.status()
    assert status.stale
    assert status.keys is not None
    assert status.keys["ready"] == 2
    clock.advance(30)  # None's window is over, "a" is in its own
    with pytest.raises(ConnectionError, match="None"):
        await get(None)
    assert await get("a") == "a #1"
    assert runs.count("a") == 2


async def test_with_refresh_a_refresh_failed_before_the_ttl_serves_the_value_past_it_at_once(
    clock: FakeClock,
) -> None:
    """refresh=: a background refresh that failed before the ttl keeps serving; past the ttl the
    value is served at once (it is known failing) until the window ends."""
    source = Source()
    get = once(source.make, refresh=5, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(6)
    source.failing = True
    assert at_once(get) == 1  # starts refresh 2, which fails
    await wait_until(lambda: source.runs == 2 and get.status().state == "ready")
    clock.advance(5)  # past the ttl
    source.gate = anyio.Event()
    assert at_once(get) == 1
    await wait_until(lambda: source.runs == 3)
    status = get.status()
    assert (status.state, status.stale) == ("refreshing", True)
    source.gate.set()
    await wait_until(lambda: get.status().state == "ready")
    clock.advance(30)
    with pytest.raises(ConnectionError):
        await get()
    await wait_until(lambda: source.closed == [1])


async def test_a_refresh_still_running_at_the_ttls_end_is_joined_and_its_failure_is_covered(
    clock: FakeClock,
) -> None:
    """refresh=: calls past the ttl join the refresh in flight; if it fails they get the stale
    value, as the first attempt past the ttl would give it."""
    source = Source()
    get = once(source.make, refresh=5, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(6)
    source.gate, source.failing = anyio.Event(), True
    assert at_once(get) == 1  # starts refresh 2, which hangs
    await wait_until(lambda: source.runs == 2)
    clock.advance(5)  # past the ttl, nothing has failed yet
    assert (get.status().state, get.status().stale) == ("running", True)
    async with anyio.create_task_group() as group:
        results: list[int] = []

        async def call() -> None:
            results.append(await get())

        for _ in range(5):
            group.start_soon(call)
        await wait_until(lambda: get.status().joins >= 5)
        source.gate.set()
    assert results == [1] * 5
    assert source.runs == 2


async def test_with_cooldown_no_attempt_starts_while_it_lasts_and_the_stale_value_is_served(
    clock: FakeClock,
) -> None:
    """cooldown= spaces the attempts made while a stale value is served."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=60, cooldown=20)
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    assert await get() == 1  # run 2 failed: cooldown until 20 s from now
    for _ in range(6):
        clock.advance(3)
        assert at_once(get) == 1
    await anyio.sleep(0.01)
    assert source.runs == 2
    clock.advance(3)  # the cooldown is over
    assert at_once(get) == 1
    await wait_until(lambda: source.runs == 3)
    await wait_until(lambda: get.status().state == "ready")
    assert at_once(get) == 1  # run 3 failed too: a new cooldown
    await anyio.sleep(0.01)
    assert source.runs == 3


async def test_a_timed_out_attempt_past_the_ttl_gives_its_waiters_the_old_value(
    clock: FakeClock,
) -> None:
    """timeout=: a timeout is a failure; within the window its waiters get the old value."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30, timeout=0.05)
    assert await get() == 1
    clock.advance(11)
    source.gate = anyio.Event()  # never set: run 2 hangs until the timeout cancels it
    assert await get() == 1
    await wait_until(lambda: get.status().state == "ready")
    assert get.status().last_error_type == "OnceTimeoutError"


async def test_without_stale_if_error_a_failure_past_the_ttl_reaches_the_callers(
    clock: FakeClock,
) -> None:
    """The option off: past the ttl the old value is retired and a failure is raised."""
    source = Source()
    get = once(source.make, ttl=10)
    assert await get() == 1
    clock.advance(11)
    assert not get.status().stale
    source.failing = True
    with pytest.raises(ConnectionError):
        await get()
    await wait_until(lambda: source.closed == [1])


async def test_status_says_until_when_a_stale_value_is_kept(clock: FakeClock) -> None:
    """status().stale_until is the wall-clock time the stale value is retired."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    made_at = get.status().made_at
    assert made_at is not None
    assert get.status().stale_until is None
    clock.advance(11)
    stale_until = get.status().stale_until
    assert stale_until is not None
    assert (stale_until - made_at).total_seconds() == pytest.approx(40, abs=0.5)


async def test_readiness_counts_a_stale_value_as_ready_and_says_it_is_stale(
    clock: FakeClock,
) -> None:
    """The probe answers 200 while a stale value is served, marking it "stale"."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    app = FastAPI()
    app.include_router(readiness_router(get, warm=False))
    assert await get() == 1
    clock.advance(11)
    source.failing = True
    assert await get() == 1
    await wait_until(lambda: get.status().state == "ready")
    async with AsyncClient(transport=ASGITransport(app), base_url="http://test") as client:
        response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["onces"][get.name] == {"state": "ready", "stale": True}


async def test_readiness_renews_a_stale_value_before_any_failure(clock: FakeClock) -> None:
    """Past the ttl, nothing failed yet: a warming probe starts the attempt and says renewing."""
    source = Source()
    get = once(source.make, ttl=10, stale_if_error=30)
    app = FastAPI()
    app.include_router(readiness_router(get))
    assert await get() == 1
    clock.advance(11)
    source.gate = anyio.Event()
    async with AsyncClient(transport=ASGITransport(app), base_url="http://test") as client:
        response = await client.get("/ready")
        assert response.status_code == 200
        assert response.json()["onces"][get.name] == {
            "state": "running",
            "stale": True,
            "renewing": True,
        }
        await wait_until(lambda: source.runs == 2)
        source.gate.set()
        await wait_until(lambda: get.status().state == "ready")
    assert await get() == 2


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"stale_if_error": 30}, TypeError, "applies only with ttl="),
        ({"ttl": 10, "stale_if_error": math.nan}, ValueError, "must be a finite number"),
        ({"ttl": 10, "stale_if_error": math.inf}, ValueError, "must be a finite number"),
        ({"ttl": 10, "stale_if_error": 0}, ValueError, "must be a positive number"),
        ({"ttl": 10, "stale_if_error": -1}, ValueError, "must be a positive number"),
        ({"ttl": 10, "stale_if_error": "30"}, TypeError, "takes seconds as a number"),
    ],
    ids=["no-ttl", "nan", "inf", "zero", "negative", "string"],
)
def test_stale_if_error_is_checked_at_once_time(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    """A bad stale_if_error= is refused by once() with a message naming the option."""

    async def make() -> int:
        return 1

    with pytest.raises(error, match=f"stale_if_error.*{message}|{message}"):
        once(make, **options)  # type: ignore[arg-type]
