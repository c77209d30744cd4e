"""Failure policy: timeout=, retries=/backoff=/retry_on=, cooldown=."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import anyio
import httpx
import pytest
from crowd import crowd
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from timekeeping import FakeClock

from fastapi_once import OnceTimeoutError, once
from fastapi_once._policy import MAX_BACKOFF, Policy

pytestmark = pytest.mark.anyio


async def test_an_attempt_past_its_timeout_is_cancelled_and_every_waiter_gets_timeout() -> None:
    """timeout=: the work is cancelled; all waiters get a TimeoutError naming the once."""
    cancelled = False
    runs = 0

    @once(timeout=0.05)
    async def connect() -> str:
        nonlocal cancelled, runs
        runs += 1
        if runs > 1:
            return "connected"
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise
        return "never"  # pragma: no cover

    errors: list[BaseException] = []

    async def caller() -> None:
        try:
            await connect()
        except TimeoutError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(caller)
    assert len(errors) == 20
    assert all(isinstance(e, OnceTimeoutError) and e is errors[0] for e in errors)
    assert "connect did not finish within its timeout of 0.05 s" in str(errors[0])
    assert cancelled
    assert await connect() == "connected"


async def test_a_def_past_its_timeout_releases_its_waiters() -> None:
    """A blocking def cannot be cancelled: its waiters are released and its thread abandoned."""
    import threading

    release = threading.Event()

    @once(timeout=0.05)
    def slow() -> str:
        release.wait(5)
        return "late"

    with pytest.raises(OnceTimeoutError):
        await slow()
    release.set()


async def test_failed_tries_are_retried_within_one_attempt() -> None:
    """retries=: the waiters of the one attempt get the value of a later try."""
    calls = 0

    @once(retries=3, backoff=0.001)
    async def connect() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError(f"refused {calls}")
        return f"connected on try {calls}"

    results = await crowd(connect, 50)
    assert results == ["connected on try 3"] * 50
    assert calls == 3
    assert connect.status().attempts == 1


async def test_when_every_try_fails_waiters_see_the_last_error() -> None:
    """All tries failed: the last try's exception reaches the waiters."""
    calls = 0

    @once(retries=2, backoff=0.001)
    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"refused {calls}")

    with pytest.raises(ConnectionError, match="refused 3"):
        await connect()
    assert calls == 3


async def test_only_the_chosen_exceptions_are_retried() -> None:
    """retry_on=: other exceptions end the attempt at once."""
    calls = 0

    @once(retries=5, backoff=0.001, retry_on=ConnectionError)
    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad settings")

    with pytest.raises(ValueError, match="bad settings"):
        await connect()
    assert calls == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancellation_is_never_retried() -> None:
    """Even with retry_on=BaseException, a cancellation ends the attempt."""
    calls = 0

    @once(retries=5, backoff=0.001, retry_on=BaseException)
    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(Exception, match="was cancelled"):
        await connect()
    assert calls == 1


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    """Each retry's sleep lies in [ceiling/2, ceiling], the ceiling doubling up to the cap."""
    policy = Policy(retries=20, backoff=0.1)
    for retry in range(1, 12):
        ceiling = min(MAX_BACKOFF, 0.1 * 2 ** (retry - 1))
        delays = [policy.delay(retry) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


async def test_within_the_cooldown_calls_fail_fast_with_the_same_error(clock: FakeClock) -> None:
    """cooldown=: no new attempt inside the cooldown; a fresh one after it."""
    calls = 0

    @once(cooldown=10)
    async def connect() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database down")
        return "connected"

    with pytest.raises(ConnectionError) as first:
        await connect()
    for _ in range(100):
        with pytest.raises(ConnectionError) as again:
            await connect()
        assert again.value is first.value
    assert calls == 1
    assert connect.status().state == "failed"
    clock.advance(10)
    assert await connect() == "connected"
    assert calls == 2


async def test_reset_forgets_the_cooldown(clock: FakeClock) -> None:
    """reset() lets the next call try again at once."""
    calls = 0

    @once(cooldown=60)
    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await connect()
    await connect.reset()
    with pytest.raises(ConnectionError):
        await connect()
    assert calls == 2


async def test_a_retry_storm_is_held_to_one_attempt_per_cooldown(clock: FakeClock) -> None:
    """1,000 requests over 1.5 s against a dead dependency, cooldown=1: 2 attempts, no waiting.

    Ten waves of 100 concurrent requests arrive 0.15 s apart (on the fake clock). Only the waves
    that found no fresh failure started (or joined) an attempt; every other request failed fast.
    """
    attempts = 0

    @once(cooldown=1)
    async def get_db() -> str:
        nonlocal attempts
        attempts += 1
        await anyio.sleep(0.02)
        raise ConnectionError("database down")

    app = FastAPI()

    @app.exception_handler(ConnectionError)
    async def unavailable(request: Request, exc: ConnectionError) -> JSONResponse:
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db  # pragma: no cover

    statuses: list[int] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:

        async def request() -> None:
            statuses.append((await http.get("/")).status_code)

        for _ in range(10):
            async with anyio.create_task_group() as wave:
                for _ in range(100):
                    wave.start_soon(request)
            clock.advance(0.15)
    assert statuses == [503] * 1000
    assert attempts == 2  # at t=0 and at t=1.05; the other eight waves failed fast
    status = get_db.status()
    assert (status.attempts, status.joins) == (2, 198)


async def test_timeout_abandons_a_blocking_def_sub_dependency() -> None:
    """timeout= bounds sub-dependencies too: a blocking def sub-dependency times out."""
    import threading

    unblock = threading.Event()

    def get_settings() -> str:
        unblock.wait(10)
        return "settings"

    @once(timeout=0.1)
    async def get_db(settings: str = Depends(get_settings)) -> str:
        return f"db with {settings}"

    try:
        with anyio.fail_after(5), pytest.raises(OnceTimeoutError):
            await get_db()
    finally:
        unblock.set()


async def test_a_sync_generator_that_yields_after_its_timeout_is_still_closed() -> None:
    """The attempt timed out; the generator yields later: its cleanup still runs."""
    import threading

    unblock = threading.Event()
    closed = threading.Event()

    @once(timeout=0.05)
    def client() -> Iterator[str]:
        unblock.wait(10)
        yield "client"
        closed.set()

    with pytest.raises(OnceTimeoutError):
        await client()
    unblock.set()
    with anyio.fail_after(5):
        await anyio.to_thread.run_sync(closed.wait)


@pytest.mark.parametrize("option", ["timeout", "cooldown", "ttl", "refresh", "backoff", "jitter"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_naming_the_option(option: str, value: float) -> None:
    """A non-finite number of seconds is a ValueError that names the option."""

    async def fn() -> int:
        return 1

    extra = {"retries": 1} if option == "backoff" else {"ttl": 10} if option == "jitter" else {}
    with pytest.raises(ValueError, match=f"{option}=.*finite"):
        once(fn, **{option: value, **extra})  # type: ignore[arg-type]


async def test_any_number_of_retries_ends_with_the_last_error() -> None:
    """retries= far past the backoff's doublings still ends with the last try's error."""
    tries = 0

    @once(retries=1500, backoff=0)
    async def connect() -> None:
        nonlocal tries
        tries += 1
        raise ConnectionError(f"try {tries}")

    with pytest.raises(ConnectionError, match="try 1501"):
        await connect()
    assert Policy(retries=10**6, backoff=0.1).delay(10**6) <= MAX_BACKOFF
