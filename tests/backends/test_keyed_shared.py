"""Keyed records shared by two backend instances in one process (Redis; see pytestmark).

Two instances of a backend hold separate connections (PostgreSQL advisory locks belong to a
session, Redis locks to a token), so they meet as two processes would: one leads, the other
follows, a failure cools down for both, a refresh runs once, a reset reaches both.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from timekeeping import wait_until

from fastapi_once import once
from fastapi_once._keys import shared_key_digest
from fastapi_once.backends import Backend, OnceCoolingDownError, WaitTimeoutError

# The lease algorithm's behaviours (test_lease.py, store_contract.py), end to end on Redis; what
# depends on a store's own statements runs on each store.
pytestmark = [pytest.mark.anyio, pytest.mark.kinds("redis")]


@pytest.fixture
def name() -> str:
    """A once name of the test's own."""
    return f"tests.shared.get_stuff@{secrets.token_hex(4)}"


def key(name: str, url: str) -> str:
    """The digest the backend gets for ``url``."""
    return shared_key_digest(name, url)


def never() -> Callable[[], Awaitable[Any]]:
    """Work that must not run (the value comes from the other instance)."""

    async def work() -> Any:
        raise AssertionError("a follower ran the work")

    return work


def value(result: Any) -> Callable[[], Awaitable[Any]]:
    """Work that returns ``result`` at once."""

    async def work() -> Any:
        return result

    return work


async def test_a_follower_waits_for_the_leader_and_is_woken_by_its_notification(
    make: Callable[..., Backend], name: str
) -> None:
    """The follower gets the leader's value without running the work; with recheck_interval
    far longer than the test's limit, only the leader's announcement can wake it."""
    leader, follower = make(), make(recheck_interval=60)
    started, release = anyio.Event(), anyio.Event()

    async def slow() -> dict[str, str]:
        started.set()
        await release.wait()
        return {"by": "leader"}

    got: list[Any] = []

    async def follow() -> None:
        got.append(await follower.run_keyed(name, key(name, "/a"), never(), ttl=60))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: leader.run_keyed(name, key(name, "/a"), slow, ttl=60))
            await started.wait()
            tg.start_soon(follow)
            await anyio.sleep(0.3)  # the follower is waiting
            assert got == []
            release.set()
    assert got == [{"by": "leader"}]


async def test_a_failure_cools_down_for_the_other_instance_until_the_key_is_reset(
    make: Callable[..., Backend], name: str
) -> None:
    """The leader's failure reaches it unchanged; the other instance then fails fast with
    OnceCoolingDownError (no run of its own) until reset_keyed deletes the cooldown."""
    first, second = make(), make()

    async def fail() -> Any:
        raise ConnectionRefusedError("upstream down")

    digest = key(name, "/a")
    with pytest.raises(ConnectionRefusedError, match="upstream down"):
        await first.run_keyed(name, digest, fail, ttl=60, cooldown=30)
    with pytest.raises(OnceCoolingDownError) as info:
        await second.run_keyed(name, digest, never(), ttl=60, cooldown=30)
    assert "upstream down" not in str(info.value)
    assert 0 < info.value.seconds_left <= 30
    await first.reset_keyed(name, digest)
    assert await second.run_keyed(name, digest, value("again"), ttl=60, cooldown=30) == "again"


async def test_a_failure_without_cooldown_lets_the_next_caller_run_at_once(
    make: Callable[..., Backend], name: str
) -> None:
    """cooldown=None records nothing: the other instance runs the work itself."""
    first, second = make(), make()

    async def fail() -> Any:
        raise RuntimeError("boom")

    digest = key(name, "/a")
    with pytest.raises(RuntimeError):
        await first.run_keyed(name, digest, fail, ttl=60)
    assert await second.run_keyed(name, digest, value("ran"), ttl=60) == "ran"


async def test_a_stale_record_is_refreshed_by_one_instance_while_the_other_is_served_it(
    make: Callable[..., Backend], name: str
) -> None:
    """Past refresh=, one instance makes the value again; the other keeps getting the old
    value meanwhile (it does not wait, nor run), and the new one after."""
    first, second = make(), make()
    digest = key(name, "/a")
    assert await first.run_keyed(name, digest, value(1), ttl=60, refresh=0.2) == 1
    await anyio.sleep(0.4)
    started, release = anyio.Event(), anyio.Event()

    async def remake() -> int:
        started.set()
        await release.wait()
        return 2

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: first.run_keyed(name, digest, remake, ttl=60, refresh=0.2))
            await started.wait()
            assert await second.run_keyed(name, digest, never(), ttl=60, refresh=0.2) == 1
            release.set()
    assert await second.run_keyed(name, digest, never(), ttl=60) == 2  # recorded


async def test_a_fresh_record_is_served_without_a_run_however_often_refresh_is_asked(
    make: Callable[..., Backend], name: str
) -> None:
    """A record younger than refresh= is served as it is."""
    first, second = make(), make()
    digest = key(name, "/a")
    assert await first.run_keyed(name, digest, value("v"), ttl=60, refresh=30) == "v"
    assert await second.run_keyed(name, digest, never(), ttl=60, refresh=30) == "v"


async def test_resetting_one_key_remakes_only_it_and_resetting_all_remakes_every_key(
    make: Callable[..., Backend], name: str
) -> None:
    """reset_keyed(name, digest) deletes one key's record; reset_keyed(name, None) every key's
    of that name, and no other name's."""
    first, second = make(), make()
    other = name + ".other"
    for url in ("/a", "/b"):
        await first.run_keyed(name, key(name, url), value(f"{url} 1"), ttl=60)
    await first.run_keyed(other, key(other, "/a"), value("other"), ttl=60)
    await second.reset_keyed(name, key(name, "/a"))
    assert await second.run_keyed(name, key(name, "/a"), value("/a 2"), ttl=60) == "/a 2"
    assert await second.run_keyed(name, key(name, "/b"), never(), ttl=60) == "/b 1"
    await second.reset_keyed(name, None)
    for url in ("/a", "/b"):
        assert await first.run_keyed(name, key(name, url), value(f"{url} 3"), ttl=60) == f"{url} 3"
    assert await first.run_keyed(other, key(other, "/a"), never(), ttl=60) == "other"


async def test_a_follower_waiting_longer_than_wait_timeout_fails_naming_the_leader(
    make: Callable[..., Backend], name: str
) -> None:
    """WaitTimeoutError after wait_timeout=, while the leader still works; the leader's
    value is recorded all the same."""
    leader, follower = make(), make(wait_timeout=0.5, recheck_interval=0.1)
    started, release = anyio.Event(), anyio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "late"

    digest = key(name, "/a")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: leader.run_keyed(name, digest, slow, ttl=60))
            await started.wait()
            with pytest.raises(WaitTimeoutError) as info:
                await follower.run_keyed(name, digest, never(), ttl=60)
            release.set()
    assert info.value.holder is not None  # who held the lock
    assert "pid" in info.value.holder
    assert await follower.run_keyed(name, digest, never(), ttl=60) == "late"


async def test_a_value_over_max_value_bytes_is_refused_and_not_recorded(
    make: Callable[..., Backend], name: str
) -> None:
    """ValueError names the limit; the value is not recorded, so the other instance runs the
    work itself."""
    small, other = make(max_value_bytes=16), make()
    digest = key(name, "/a")
    with pytest.raises(ValueError, match=r"over the limit of 16 bytes.*max_value_bytes="):
        await small.run_keyed(name, digest, value("x" * 100), ttl=60)
    assert await other.run_keyed(name, digest, value("ok"), ttl=60) == "ok"


async def test_a_reset_in_one_instance_makes_a_once_on_the_other_forget_its_value(
    make: Callable[..., Backend], name: str
) -> None:
    """Two onces of one name on two instances: a reset through one reaches the other's
    listener, which drops the value it held, so its next call runs its function again."""
    runs: list[str] = []

    async def fetch_here(url: str) -> str:
        runs.append(url)
        return f"{url} run {len(runs)}"

    async def fetch_there(url: str) -> str:
        return f"{url} there"

    here = once(fetch_here, key=lambda url: url, ttl=60, across=make(), name=name)
    there = once(fetch_there, key=lambda url: url, ttl=60, across=make(), name=name)
    assert await here("/a") == "/a run 1"
    assert await there("/a") == "/a run 1"  # the shared record
    assert await here("/a") == "/a run 1"  # from memory
    await there.reset("/a")

    async def forgotten() -> bool:
        return await here("/a") != "/a run 1"

    await wait_until(forgotten)  # the listener hears the reset
    assert runs == ["/a", "/a"]


async def test_resetting_every_key_in_one_instance_makes_the_other_forget_them_all(
    make: Callable[..., Backend], name: str
) -> None:
    """reset() without a key, through the other once, drops every key this one held."""
    runs: list[str] = []

    async def fetch_here(url: str) -> str:
        runs.append(url)
        return url + str(runs.count(url))

    async def fetch_there(url: str) -> str:
        return url

    here = once(fetch_here, key=lambda url: url, ttl=60, across=make(), name=name)
    there = once(fetch_there, key=lambda url: url, ttl=60, across=make(), name=name)
    assert [await here("/a"), await here("/b")] == ["/a1", "/b1"]
    await there.reset()

    async def forgotten() -> bool:
        return await here("/b") != "/b1"

    await wait_until(forgotten)  # the listener hears the reset
    assert await here("/a") == "/a2"


async def test_many_callers_of_a_cold_key_on_two_instances_run_the_work_once(
    make: Callable[..., Backend], name: str
) -> None:
    """Twenty callers on each instance race for one cold key: the work runs once and every
    caller gets its value (those that lose the race to the lock follow the winner)."""
    instances = [make(), make()]
    runs: list[int] = []
    got: list[Any] = []

    async def work() -> str:
        runs.append(1)
        await anyio.sleep(0.05)
        return "made once"

    async def call(backend: Backend) -> None:
        got.append(await backend.run_keyed(name, key(name, "/a"), work, ttl=60))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                for backend in instances:
                    tg.start_soon(call, backend)
    assert runs == [1]
    assert got == ["made once"] * 40


async def test_many_callers_of_a_failing_cold_key_get_one_failure_and_then_the_cooldown(
    make: Callable[..., Backend], name: str
) -> None:
    """Twenty callers on each instance race for a cold key whose work fails: it runs once,
    its caller gets the exception, every other caller OnceCoolingDownError."""
    instances = [make(), make()]
    runs: list[int] = []
    errors: list[type[BaseException]] = []

    async def work() -> str:
        runs.append(1)
        await anyio.sleep(0.05)
        raise ConnectionRefusedError("upstream down")

    async def call(backend: Backend) -> None:
        try:
            await backend.run_keyed(name, key(name, "/a"), work, ttl=60, cooldown=30)
        except (ConnectionRefusedError, OnceCoolingDownError) as exc:
            errors.append(type(exc))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                for backend in instances:
                    tg.start_soon(call, backend)
    assert runs == [1]
    assert (
        sorted(errors, key=lambda e: e.__name__)
        == [ConnectionRefusedError] + [OnceCoolingDownError] * 39
    )


async def test_a_cancelled_leader_frees_the_key_at_once_without_a_cooldown(
    make: Callable[..., Backend], name: str, spec: dict[str, Any]
) -> None:
    """Cancelling the leader's call (a client gone) frees the lock now, not when a lease
    ends, and records no cooldown: the other instance runs the work straight away."""
    # On Redis a lease far longer than the test's limit: only freeing the lock lets it pass.
    leader = make(lease=60.0) if spec["kind"] == "redis" else make()
    other = make()
    digest = key(name, "/a")
    started = anyio.Event()

    async def hang() -> str:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("cancelled")  # pragma: no cover

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: leader.run_keyed(name, digest, hang, ttl=60, cooldown=30))
            await started.wait()
            tg.cancel_scope.cancel()
        assert await other.run_keyed(name, digest, value("ran"), ttl=60, cooldown=30) == "ran"


@pytest.mark.kinds("redis", "postgres")  # each store deletes many records its own way
async def test_resetting_every_key_deletes_them_all_when_there_are_many(
    make: Callable[..., Backend], name: str
) -> None:
    """reset_keyed(name, None) deletes 600 keys' records (more than one batch of deletes)."""
    backend = make()
    urls = [f"/{i}" for i in range(600)]
    with anyio.fail_after(60):
        for url in urls:
            await backend.run_keyed(name, key(name, url), value(1), ttl=60)
        await backend.reset_keyed(name, None)
        for url in ("/0", "/299", "/599"):
            assert await backend.run_keyed(name, key(name, url), value(2), ttl=60) == 2
