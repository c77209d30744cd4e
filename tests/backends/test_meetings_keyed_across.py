"""Where keyed ``across=`` meets other features (asyncio only; each test names its stores).

Two backend instances in one process stand for two processes (as in test_keyed_shared.py):
each holds its own connections, locks and listener.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from timekeeping import wait_until

from fastapi_once._keys import shared_key_digest
from fastapi_once.backends import Backend

# Each test runs on the store its defect was found on; a meeting of features the lease algorithm
# owns (not a store) runs end to end on Redis only (test_lease.py covers the algorithm itself).
pytestmark = [pytest.mark.anyio, pytest.mark.kinds("redis")]


@pytest.fixture
def name() -> str:
    """A once name of the test's own."""
    return f"tests.meetings.get_stuff@{secrets.token_hex(4)}"


def value(result: Any) -> Callable[[], Awaitable[Any]]:
    """Work that returns ``result`` at once."""

    async def work() -> Any:
        return result

    return work


@pytest.mark.kinds("postgres", "postgres-xact")
async def test_a_cancelled_leader_wakes_the_other_instances_followers_at_once(
    make: Callable[..., Backend], name: str
) -> None:
    """A leader cancelled while it holds the key's lock frees it and announces its end: a
    follower of another instance, whose recheck_interval is far beyond the test's limit, takes
    the key over and runs the work (no cooldown recorded for a cancellation)."""
    leader, follower = make(), make(recheck_interval=600)
    digest = shared_key_digest(name, "/a")
    started = anyio.Event()
    waiting: list[bool] = []

    async def hang() -> Any:
        started.set()
        await anyio.sleep_forever()

    async def lead(scope: anyio.CancelScope) -> None:
        with scope:
            await leader.run_keyed(name, digest, hang, ttl=60, cooldown=60)

    async def follow() -> Any:
        waiting.append(True)
        return await follower.run_keyed(name, digest, value("taken over"), ttl=60, cooldown=60)

    got: list[Any] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()
            tg.start_soon(lead, scope)
            await started.wait()

            async def run_follower() -> None:
                got.append(await follow())

            tg.start_soon(run_follower)
            await anyio.sleep(0.5)  # the follower has found the lock held and waits
            assert got == []
            scope.cancel()
    assert got == ["taken over"]


@pytest.mark.kinds("redis")
async def test_a_leader_cancelled_before_the_lock_reply_arrives_leaves_the_key_free(
    make: Callable[..., Backend], name: str
) -> None:
    """A caller cancelled while the lock script's reply is on its way (the server took the
    lock for it) frees the lock: another instance leads at once, not after the 60 s lease."""
    from fastapi_once.backends._redis import CLAIM

    first, second = make(lease=60), make(lease=60, recheck_interval=600)
    digest = shared_key_digest(name, "/a")
    client = first._clients.get()  # type: ignore[attr-defined]
    claim, real = client.register_script(CLAIM).sha, client.evalsha
    sent = anyio.Event()

    async def reply_delayed(sha: str, *args: Any) -> Any:
        got = await real(sha, *args)
        if sha == claim:
            sent.set()
            await anyio.sleep_forever()  # the reply never reaches the caller
        return got

    client.evalsha = reply_delayed
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: first.run_keyed(name, digest, value("first"), ttl=60))
            await sent.wait()
            tg.cancel_scope.cancel()
        assert await second.run_keyed(name, digest, value("second"), ttl=60) == "second"


async def test_a_reset_from_elsewhere_while_a_local_follower_waits_does_not_stall_its_wakeup(
    make: Callable[..., Backend], name: str
) -> None:
    """Another instance resets a key while this process's once waits, as a follower, on a third
    party's leader: the reset must not hold this loop's listener until the local attempt ends,
    or the leader's announcement would never reach the follower (recheck_interval is 600 s)."""
    from fastapi_once import once

    leader, resetter, here = make(), make(), make(recheck_interval=600)
    digest = shared_key_digest(name, "/a")
    started, release = anyio.Event(), anyio.Event()

    async def slow() -> Any:
        started.set()
        await release.wait()
        return "from the leader"

    async def get_stuff(url: str) -> Any:
        raise AssertionError("this process follows")

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=here, name=name)
    got: list[Any] = []

    async def follow() -> None:
        got.append(await stuff("/a"))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: leader.run_keyed(name, digest, slow, ttl=60))
            await started.wait()
            tg.start_soon(follow)
            await anyio.sleep(0.5)  # the once's attempt follows the leader
            await resetter.reset_keyed(name, digest)
            await anyio.sleep(0.5)  # here's listener has heard the reset
            release.set()
    assert got == ["from the leader"]


@pytest.mark.kinds("redis", "postgres")
async def test_followers_waiting_through_an_aclose_of_their_backend_still_get_the_value(
    make: Callable[..., Backend], name: str
) -> None:
    """aclose() on the follower's backend while it waits (its connections reopen on next use):
    the follower is still woken by the leader's end, not left to its 600 s recheck_interval."""
    leader, here = make(), make(recheck_interval=600)
    digest = shared_key_digest(name, "/a")
    started, release = anyio.Event(), anyio.Event()

    async def slow() -> Any:
        started.set()
        await release.wait()
        return "from the leader"

    got: list[Any] = []

    async def follow() -> None:
        got.append(await here.run_keyed(name, digest, value("not me"), ttl=60))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: leader.run_keyed(name, digest, slow, ttl=60))
            await started.wait()
            tg.start_soon(follow)
            await anyio.sleep(0.5)  # the follower waits
            await here.aclose()
            await anyio.sleep(0.5)
            release.set()
    assert got == ["from the leader"]


@pytest.mark.kinds("redis")
async def test_bytes_that_json_cannot_carry_are_refused_naming_the_once_and_not_the_key(
    make: Callable[..., Backend], name: str
) -> None:
    """A result annotated bytes that is not UTF-8 (pydantic sends bytes as UTF-8 text) is a
    TypeError naming the once (by the key's digest), the annotation and the backend: not a bare
    UnicodeDecodeError from inside pydantic."""
    from fastapi_once import once

    async def get_blob(url: str) -> bytes:
        return b"\xff\x00"

    blob = once(get_blob, key=lambda url: url, ttl=60, across=make(), name=name)
    with anyio.fail_after(20), pytest.raises(TypeError) as info:
        await blob("/secret-url")
    message = str(info.value)
    assert name in message
    assert "bytes" in message
    assert "RedisBackend" in message
    assert "secret-url" not in message


@pytest.mark.kinds("file", "redis")  # the defect was in the code every store shared
async def test_a_reset_reaches_the_other_event_loops_of_the_resetting_process(
    make: Callable[..., Backend], name: str
) -> None:
    """A keyed reset in one event loop is heard by the process's other loops that share the
    backend (as by other processes): another loop's value for the key is forgotten, and its
    next call runs the function again."""
    import asyncio
    import threading

    from fastapi_once import once

    backend = make()
    made: list[str] = []

    async def get_stuff(url: str) -> str:
        made.append(url)
        return f"{url} #{len(made)}"

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=backend, name=name)
    first_done, reset_done = threading.Event(), threading.Event()
    seen: list[Any] = []

    async def other_loop() -> None:
        try:
            seen.append(await stuff("/a"))
            first_done.set()
            await wait_until(reset_done.is_set)
            await wait_until(lambda: not stuff.status().keys["ready"])  # the reset is heard
            seen.append(await stuff("/a"))
        finally:
            await backend.aclose()

    def in_thread() -> None:
        try:
            asyncio.run(asyncio.wait_for(other_loop(), 20))
        except BaseException as exc:  # the test reports it
            seen.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    with anyio.fail_after(30):
        await wait_until(lambda: first_done.is_set() or not thread.is_alive())
        assert await stuff("/a") == "/a #1"  # this loop gets the record
        await stuff.reset("/a")
        reset_done.set()
        await anyio.to_thread.run_sync(thread.join)
    assert seen == ["/a #1", "/a #2"]


async def test_none_and_keys_whose_text_looks_alike_each_have_a_record_of_their_own(
    make: Callable[..., Backend], name: str
) -> None:
    """None, 1, "1", (1,) and ("1",) are five keys fleet-wide: another instance is served each
    one's own value, not a neighbour's."""
    from fastapi_once import once

    keys: list[Any] = [None, 1, "1", (1,), ("1",)]

    async def get_stuff(k: Any) -> str:
        return f"made for {k!r}"

    async def never_runs(k: Any) -> str:
        raise AssertionError("the other instance recorded every key")

    here = once(get_stuff, key=lambda k: k, ttl=60, across=make(), name=name)
    there = once(never_runs, key=lambda k: k, ttl=60, across=make(), name=name)
    with anyio.fail_after(20):
        for k in keys:
            assert await here(k) == f"made for {k!r}"
        for k in keys:
            assert await there(k) == f"made for {k!r}"


async def test_a_value_evicted_by_maxsize_comes_back_from_the_store_without_a_run(
    make: Callable[..., Backend], name: str
) -> None:
    """maxsize= evicts a key's value from the process while the store still has it: the next
    call reads the record (no second run) and evicts the oldest key in turn."""
    from fastapi_once import once

    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        return url.upper()

    stuff = once(get_stuff, key=lambda url: url, ttl=60, maxsize=1, across=make(), name=name)
    with anyio.fail_after(20):
        assert await stuff("/a") == "/A"
        assert await stuff("/b") == "/B"  # evicts /a here
        assert stuff.status().size == 1
        assert await stuff("/a") == "/A"
    assert runs == ["/a", "/b"]


async def test_a_stale_value_is_served_while_another_instances_failure_cools_the_key_down(
    make: Callable[..., Backend], name: str
) -> None:
    """stale_if_error=: past the ttl, this instance's try meets the cooldown another instance's
    failure recorded (OnceCoolingDownError, no run here) and serves its stale value."""
    from fastapi_once import once

    failing = False
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        if failing:
            raise ConnectionError("upstream down")
        return "fresh"

    async def get_stuff_there(url: str) -> str:
        return await get_stuff(url)

    options: dict[str, Any] = {"key": lambda url: url, "ttl": 0.3, "cooldown": 60, "name": name}
    here = once(get_stuff, stale_if_error=60, across=make(), **options)
    there = once(get_stuff_there, across=make(), **options)
    with anyio.fail_after(20):
        assert await here("/a") == "fresh"
        await anyio.sleep(0.5)  # past the ttl, here and in the store
        failing = True
        with pytest.raises(ConnectionError):
            await there("/a")  # records the cooldown
        assert await here("/a") == "fresh"  # stale, served: the cooldown reached it
    assert runs == ["/a", "/a"]


@pytest.mark.kinds("redis", "postgres")
async def test_no_key_text_nor_password_reaches_logs_errors_or_status_on_any_path(
    make: Callable[..., Backend],
    name: str,
    spec: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leading, following, failing, cooling down, a wait timeout and resets: the key's text
    and the server's password show in no log at INFO, no error raised and no status."""
    import logging

    from backend_servers import secret_of

    from fastapi_once import once
    from fastapi_once.backends import OnceCoolingDownError, WaitTimeoutError

    secret_key = "tok-" + secrets.token_hex(8)
    password = secret_of(spec)
    failing = False

    async def get_stuff(url: str) -> str:
        if failing:
            raise ConnectionError("upstream down")
        return "v"

    async def get_stuff_there(url: str) -> str:
        return await get_stuff(url)

    options: dict[str, Any] = {"key": lambda url: url, "ttl": 60, "cooldown": 60, "name": name}
    here = once(get_stuff, across=make(), **options)
    there = once(get_stuff_there, across=make(wait_timeout=0.3), **options)
    seen: list[str] = []
    caplog.set_level(logging.INFO, logger="fastapi_once")
    with anyio.fail_after(20):
        assert await here(secret_key) == "v"
        assert await there(secret_key) == "v"
        await here.reset(secret_key)
        failing = True
        with pytest.raises(ConnectionError):
            await here(secret_key + "2")
        with pytest.raises(OnceCoolingDownError) as cooling:
            await there(secret_key + "2")
        seen.append(str(cooling.value))
        held = anyio.Event()

        async def hold() -> Any:
            held.set()
            await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            leader = make()
            digest = shared_key_digest(name, secret_key + "3")
            tg.start_soon(lambda: leader.run_keyed(name, digest, hold, ttl=60))
            await held.wait()
            with pytest.raises(WaitTimeoutError) as timed_out:
                await there(secret_key + "3")
            seen.append(str(timed_out.value))
            tg.cancel_scope.cancel()
        await there.reset()
    seen += [caplog.text, repr(here.status(details=True)), repr(there.status(details=True))]
    for text in seen:
        assert secret_key not in text
        if password:
            assert password not in text


async def test_a_value_over_max_value_bytes_is_a_failure_that_cools_the_key_down_fleet_wide(
    make: Callable[..., Backend], name: str
) -> None:
    """A result larger than max_value_bytes is refused at the leader (ValueError naming the
    digest, not the key) and, as any failure with cooldown=, cools the key down for the other
    instance; the value itself is recorded nowhere."""
    from fastapi_once.backends import OnceCoolingDownError

    leader, other = make(max_value_bytes=16), make(max_value_bytes=16)
    digest = shared_key_digest(name, "/big")
    with anyio.fail_after(20):
        with pytest.raises(ValueError, match=digest[:8]):
            await leader.run_keyed(name, digest, value("x" * 100), ttl=60, cooldown=60)
        with pytest.raises(OnceCoolingDownError):
            await other.run_keyed(name, digest, value("small"), ttl=60, cooldown=60)
        await other.reset_keyed(name, digest)
        assert await other.run_keyed(name, digest, value("small"), ttl=60) == "small"


async def test_a_refresh_that_outlives_the_ttl_runs_once_and_the_other_instance_waits_for_it(
    make: Callable[..., Backend], name: str
) -> None:
    """Both instances see the key due for refresh: one refreshes (held past the ttl), the
    other is served the old value meanwhile; once the ttl has ended everywhere, the other
    instance's caller waits for that same refresh rather than running its own."""
    from fastapi_once import once

    runs: list[int] = []
    release = anyio.Event()

    async def get_stuff(url: str) -> int:
        runs.append(len(runs) + 1)
        if len(runs) > 1:
            await release.wait()
        return len(runs)

    async def get_stuff_there(url: str) -> int:
        return await get_stuff(url)

    options: dict[str, Any] = {"key": lambda url: url, "ttl": 1.0, "refresh": 0.2, "name": name}
    here = once(get_stuff, across=make(), **options)
    there = once(get_stuff_there, across=make(), **options)
    with anyio.fail_after(20):
        assert await here("/a") == 1
        assert await there("/a") == 1
        await anyio.sleep(0.4)  # due for refresh, in both and in the store
        assert await here("/a") == 1  # starts the refresh, held
        await wait_until(lambda: len(runs) == 2)
        assert await there("/a") == 1  # its own refresh is served the record
        await anyio.sleep(1.2)  # past the ttl: the record is gone, the refresh still holds
        async with anyio.create_task_group() as tg:
            got: list[int] = []

            async def call_there() -> None:
                got.append(await there("/a"))

            tg.start_soon(call_there)
            await anyio.sleep(0.3)
            assert got == []  # waits for the refresh
            release.set()
    assert got == [2]
    assert runs == [1, 2]


@pytest.mark.kinds("postgres", "postgres-xact")
async def test_a_keyed_records_ttl_runs_from_when_it_is_recorded_not_from_when_the_lock_was_taken(
    make: Callable[..., Backend], name: str
) -> None:
    """Work that takes longer than the ttl still records a live value: the other instance is
    served it (with PostgreSQL's transaction locks, now() is the lock's time, not the
    record's)."""
    first, second = make(), make()
    digest = shared_key_digest(name, "/slow")

    async def slow() -> str:
        await anyio.sleep(1.5)
        return "made slowly"

    async def never() -> str:
        raise AssertionError("the record expired as it was written")

    with anyio.fail_after(20):
        assert await first.run_keyed(name, digest, slow, ttl=1.0) == "made slowly"
        assert await second.run_keyed(name, digest, never, ttl=1.0) == "made slowly"


async def test_a_run_in_flight_elsewhere_when_its_key_is_reset_still_records_its_value(
    make: Callable[..., Backend], name: str
) -> None:
    """reset_keyed deletes the record but leaves a leader at work its lock: what that run
    makes is recorded after the reset and served (as the README says); the next run after it
    needs another reset."""
    leader, resetter = make(), make()
    digest = shared_key_digest(name, "/a")
    started, release = anyio.Event(), anyio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "made before the reset ended"

    async def never() -> str:
        raise AssertionError("the run in flight recorded its value")

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: leader.run_keyed(name, digest, slow, ttl=60))
            await started.wait()
            await resetter.reset_keyed(name, digest)
            release.set()
        assert await resetter.run_keyed(name, digest, never, ttl=60) == (
            "made before the reset ended"
        )
        await resetter.reset_keyed(name, digest)
        assert await resetter.run_keyed(name, digest, value("again"), ttl=60) == "again"


async def test_a_leader_cut_off_by_timeout_frees_the_key_without_a_fleet_wide_cooldown(
    make: Callable[..., Backend], name: str
) -> None:
    """timeout= cancels the leader's run: its callers get the timeout, the key's lock is freed
    at once and no cooldown is recorded, so another instance (whose recheck_interval is beyond
    the test's limit) runs the function itself."""
    from fastapi_once import OnceTimeoutError, once

    async def hang(url: str) -> str:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def get_stuff_there(url: str) -> str:
        return "from there"

    options: dict[str, Any] = {"key": lambda url: url, "ttl": 60, "cooldown": 60, "name": name}
    here = once(hang, timeout=0.3, across=make(), **options)
    there = once(get_stuff_there, across=make(recheck_interval=600), **options)
    with anyio.fail_after(20):
        with pytest.raises(OnceTimeoutError):
            await here("/a")
        assert await there("/a") == "from there"
