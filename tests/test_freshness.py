"""Expiry and refresh: ttl= makes a new value after a while; refresh= does it in the background."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable

import anyio
import pytest
from crowd import crowd
from timekeeping import FakeClock, wait_until

from fastapi_once import once

pytestmark = pytest.mark.anyio


async def test_a_value_past_its_ttl_is_made_again_and_the_old_one_cleaned_up(
    clock: FakeClock,
) -> None:
    """ttl=: after ttl seconds the next call makes a new value; the old one's cleanup runs."""
    made: list[int] = []
    closed: list[int] = []

    @once(ttl=60)
    async def get_token() -> AsyncIterator[int]:
        n = len(made) + 1
        made.append(n)
        yield n
        closed.append(n)

    assert await get_token() == 1
    clock.advance(59)
    assert await get_token() == 1
    clock.advance(1)
    results = await crowd(get_token, 20)
    assert results == [2] * 20
    assert made == [1, 2]
    await wait_until(lambda: bool(closed))
    assert closed == [1]


async def is_(call: Awaitable[object], expected: object) -> bool:
    return await call == expected


async def test_during_a_slow_refresh_callers_get_the_current_value_without_waiting(
    clock: FakeClock,
) -> None:
    """refresh=: one background refresh; every call meanwhile returns at once; then the new one."""
    gate = anyio.Event()
    refreshing = anyio.Event()
    version = 0
    closed: list[int] = []

    @once(refresh=10, ttl=100)
    async def get_jwks() -> AsyncIterator[int]:
        nonlocal version
        version += 1
        mine = version
        if mine > 1:
            refreshing.set()
            await gate.wait()  # a slow refresh
        yield mine
        closed.append(mine)

    assert await get_jwks() == 1
    clock.advance(10)
    for _ in range(100):
        call = get_jwks()
        with pytest.raises(StopIteration) as returned:
            call.send(None)  # completes without ever suspending: no added latency
        assert returned.value.value == 1
        await refreshing.wait()
    assert version == 2  # one refresh, not one per call
    assert get_jwks.status().state == "refreshing"
    gate.set()
    await wait_until(lambda: is_(get_jwks(), 2))
    await wait_until(lambda: closed == [1])
    assert get_jwks.status().state == "ready"


async def test_a_failed_refresh_keeps_the_old_value_logs_and_tries_again_later(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that fails leaves the current value served; a later call refreshes again."""
    calls = 0

    @once(refresh=10, ttl=100)
    async def get_config() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("config server down")
        return f"config {calls}"

    assert await get_config() == "config 1"
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="fastapi_once"):
        assert await get_config() == "config 1"
        await wait_until(lambda: calls >= 2 and get_config.status().state != "refreshing")
    assert "refresh failed after" in caplog.text
    assert "keeping the current value" in caplog.text
    assert await get_config() == "config 1"  # starts the next refresh
    await wait_until(lambda: is_(get_config(), "config 3"))


async def test_ttl_stays_the_hard_limit_when_refreshes_keep_failing(clock: FakeClock) -> None:
    """Past ttl the old value is never served, even if no refresh succeeded."""
    calls = 0

    @once(refresh=10, ttl=30)
    async def get_config() -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ConnectionError("down")
        return "config"

    assert await get_config() == "config"
    clock.advance(30)
    with pytest.raises(ConnectionError):
        await get_config()


async def test_keyed_values_expire_per_key(clock: FakeClock) -> None:
    """Each key's value has its own ttl."""
    runs: list[str] = []

    @once(key=lambda url: url, ttl=10)
    async def get_stuff(url: str) -> str:
        runs.append(url)
        return url

    await get_stuff("/a")
    clock.advance(5)
    await get_stuff("/b")
    clock.advance(5)
    await get_stuff("/a")
    await get_stuff("/b")
    assert runs == ["/a", "/b", "/a"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 10, "refresh": 10}, "refresh must be shorter than ttl"),
        ({"ttl": -1}, "ttl must be a positive number"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"cooldown": "5"}, "cooldown takes seconds as a number"),
        ({"retries": -1}, "retries must be a whole number"),
        ({"retries": 2, "retry_on": "ConnectionError"}, "retry_on takes an exception class"),
        ({"backoff": 1}, "backoff= and retry_on= apply only with retries="),
    ],
)
def test_timing_options_are_checked_at_once_time(options: dict[str, object], message: str) -> None:
    """Bad timing options raise at once() with a message naming the option."""

    async def make() -> None:
        return None

    with pytest.raises((TypeError, ValueError), match=message):
        once(make, **options)  # type: ignore[arg-type]


async def test_a_call_that_finds_the_value_expired_during_its_refresh_joins_the_refresh(
    clock: FakeClock,
) -> None:
    """Past ttl while the refresh runs: callers wait for that refresh; fn never runs twice."""
    started: list[int] = []
    in_flight = 0
    most = 0
    release = anyio.Event()

    @once(refresh=5, ttl=10)
    async def load() -> int:
        nonlocal in_flight, most
        started.append(len(started) + 1)
        in_flight += 1
        most = max(most, in_flight)
        try:
            if len(started) > 1:
                await release.wait()
            return len(started)
        finally:
            in_flight -= 1

    assert await load() == 1
    clock.advance(6)
    assert await load() == 1  # due: starts the refresh, serves the old value
    clock.advance(5)  # past ttl while the refresh still runs
    async with anyio.create_task_group() as group:
        results: list[int] = []

        async def call() -> None:
            results.append(await load())

        for _ in range(10):
            group.start_soon(call)
        await wait_until(lambda: load.status().joins >= 10)
        release.set()
    assert results == [2] * 10
    assert started == [1, 2]
    assert most == 1


async def test_a_failed_refresh_waits_out_the_cooldown_and_serves_the_old_value_until_ttl(
    clock: FakeClock,
) -> None:
    """cooldown= after a failed refresh: no refresh before it ends; the old value is served."""
    runs = 0

    @once(refresh=5, ttl=60, cooldown=20)
    async def load() -> int:
        nonlocal runs
        runs += 1
        if runs == 2:
            raise ConnectionError
        return runs

    assert await load() == 1
    clock.advance(6)
    assert await load() == 1  # starts refresh 2, which fails
    await wait_until(lambda: load.status().state == "ready" and load.status().attempts == 2)
    for _ in range(5):
        clock.advance(3)  # still within the 20 s cooldown
        assert await load() == 1
    await anyio.sleep(0.01)
    assert runs == 2  # no refresh within the cooldown
    clock.advance(10)  # the cooldown is over (and the value is not yet past its ttl)
    assert await load() == 1  # serves the old value, starts refresh 3
    await wait_until(lambda: runs == 3)
    await wait_until(lambda: load.status().state == "ready" and load.status().attempts == 3)
    assert await load() == 3


async def test_a_value_with_a_ttl_is_cleaned_up_on_time_without_traffic() -> None:
    """A value is retired when its ttl ends, not at the next call: its cleanup runs unasked."""
    closed: list[str] = []

    @once(ttl=0.05)
    async def pool() -> AsyncIterator[str]:
        yield "pool"
        closed.append("pool")

    assert await pool() == "pool"
    await wait_until(lambda: closed == ["pool"])
    assert pool.status().state == "idle"


async def test_a_refreshed_value_expires_on_time_too() -> None:
    """After a refresh, the new value's own ttl retires it; each cleanup runs once."""
    closed: list[int] = []
    made: list[int] = []

    @once(refresh=0.02, ttl=0.2)
    async def token() -> AsyncIterator[int]:
        made.append(len(made) + 1)
        n = made[-1]
        yield n
        closed.append(n)

    assert await token() == 1
    await anyio.sleep(0.03)
    assert await token() == 1  # starts the refresh
    await wait_until(lambda: closed == [1])
    await wait_until(lambda: closed == [1, 2])
    assert made == [1, 2]


async def test_jitter_spreads_the_expiry_of_values_made_together(clock: FakeClock) -> None:
    """jitter=: keys made at one moment expire at different moments, within ttl + jitter."""

    @once(key=lambda k: k, ttl=10, jitter=5, maxsize=1000)
    async def get(k: int) -> int:
        return k

    for k in range(200):
        await get(k)
    expired_at: list[float] = []
    for _ in range(160):
        clock.advance(0.1)
        keys = get.status().keys
        assert keys is not None
        expired_at.extend([clock.now] * (200 - keys["ready"] - len(expired_at)))
    assert len(expired_at) == 200  # all gone by ttl + jitter
    assert min(expired_at) >= 1010.0  # none before ttl
    assert len(set(expired_at)) > 20  # spread over the jitter window, not one herd


def test_jitter_needs_a_ttl_or_refresh() -> None:
    """jitter= alone has nothing to spread: a TypeError at once() time."""

    async def fn() -> int:
        return 1

    with pytest.raises(TypeError, match="jitter= applies only with ttl= or refresh="):
        once(fn, jitter=1)
