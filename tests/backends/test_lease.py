"""The lease algorithm (backends/_lease.py), tested once against the in-memory store.

Each MemoryStore is one process's view of the shared MemoryServer. On trio the clock is trio's
MockClock (leases, ttls and timeouts pass at once); on asyncio the times are short real ones.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from memory_store import MemoryServer, MemoryStore

from fastapi_once import once
from fastapi_once.backends import (
    BackendError,
    LeaseLostError,
    OnceCoolingDownError,
    WaitTimeoutError,
    fencing_token,
)
from fastapi_once.backends._store import UNKEYED, Lease, StoreUnavailableError

pytestmark = pytest.mark.anyio

KEY = "ab" * 20  # a key's digest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """asyncio in real time; trio with a clock that jumps over every sleep."""
    if request.param == "trio":
        import trio.testing

        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return "asyncio"


@pytest.fixture
def server() -> MemoryServer:
    return MemoryServer()


@pytest.fixture
def make(server: MemoryServer) -> Callable[..., MemoryStore]:
    def make(**options: Any) -> MemoryStore:
        options = {"lease": 0.6, "wait_timeout": 5.0, "recheck_interval": 0.5, **options}
        return MemoryStore(server, **options)

    return make


@pytest.fixture
def name() -> str:
    return f"tests.lease.{secrets.token_hex(4)}"


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records of the package's logger (not the OpenTelemetry SDK's, say)."""
    return [r for r in caplog.records if r.name == "fastapi_once"]


class Work:
    """Counts its runs; returns ``result`` after ``delay`` seconds, or raises ``error``."""

    def __init__(self, result: Any = "v", *, delay: float = 0.0, error: Exception | None = None):
        self.result, self.delay, self.error = result, delay, error
        self.runs = 0
        self.fences: list[int | None] = []
        self.started = anyio.Event()

    async def __call__(self) -> Any:
        self.runs += 1
        self.fences.append(fencing_token())
        self.started.set()
        await anyio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.result


async def test_one_process_leads_and_every_other_gets_its_value(
    make: Callable[..., MemoryStore], name: str
) -> None:
    stores = [make() for _ in range(4)]
    work = Work({"n": 1}, delay=0.3)
    got: list[Any] = []

    async def call(store: MemoryStore) -> None:
        got.append(await store.share(name, KEY, work, ttl=30))

    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(call, store)
    assert work.runs == 1
    assert got == [{"n": 1}] * 4


async def test_the_leader_runs_with_its_fencing_token_and_each_leader_has_a_larger_one(
    make: Callable[..., MemoryStore], name: str
) -> None:
    a, b = make(), make()
    work = Work()
    await a.share(name, UNKEYED, work, ttl=None)
    await b.reset(name)
    await b.share(name, UNKEYED, work, ttl=None)
    assert work.runs == 2
    first, second = work.fences
    assert isinstance(first, int)
    assert isinstance(second, int)
    assert second > first
    assert fencing_token() is None  # only inside the work


async def test_a_dead_leaders_lease_ends_and_a_follower_takes_over(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    """A leader that died renews nothing: its lease ends and a waiting follower leads."""
    dead = await make().claim(name, KEY, lease=0.6, refresh=None, holder="pid 9 on gone")
    assert isinstance(dead, Lease)
    work = Work("mine")
    with anyio.fail_after(5):
        assert await make().share(name, KEY, work, ttl=30) == "mine"
    assert work.runs == 1
    assert work.fences[0] is not None
    assert dead.fence is not None
    assert work.fences[0] > dead.fence


async def test_when_the_leader_fails_a_waiting_follower_leads_at_once_without_a_cooldown(
    make: Callable[..., MemoryStore], name: str
) -> None:
    failing = Work(error=RuntimeError("boom"), delay=0.2)
    work = Work("second")
    results: dict[str, Any] = {}

    async def lead() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await make().share(name, KEY, failing, ttl=30)

    async def follow() -> None:
        await failing.started.wait()
        results["follower"] = await make(recheck_interval=60).share(name, KEY, work, ttl=30)

    with anyio.fail_after(5):  # woken by the abandon, not by its 60 s recheck
        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            tg.start_soon(follow)
    assert results == {"follower": "second"}
    assert (failing.runs, work.runs) == (1, 1)


async def test_a_failure_cools_down_for_the_other_processes(
    make: Callable[..., MemoryStore], name: str
) -> None:
    with pytest.raises(RuntimeError):
        await make().share(name, KEY, Work(error=RuntimeError("s3cret")), ttl=30, cooldown=0.5)
    other = make()
    with pytest.raises(OnceCoolingDownError) as info:
        await other.share(name, KEY, Work(), ttl=30, cooldown=0.5)
    assert 0 < info.value.seconds_left <= 0.5
    assert "s3cret" not in str(info.value)  # the failure's text stays in its process
    assert f"{name}[#{KEY[:8]}]" in str(info.value)  # the key by its digest, as logs name it
    assert "cooling down for" in str(info.value)
    assert await other.share(name, "cd" * 20, Work("other key"), ttl=30) == "other key"
    await anyio.sleep(0.7)
    assert await other.share(name, KEY, Work("after"), ttl=30, cooldown=0.5) == "after"


async def test_a_reset_after_a_failure_ends_its_cooldown_everywhere(
    make: Callable[..., MemoryStore], name: str
) -> None:
    with pytest.raises(RuntimeError):
        await make().share(name, KEY, Work(error=RuntimeError()), ttl=30, cooldown=30)
    other = make()
    with pytest.raises(OnceCoolingDownError):
        await other.share(name, KEY, Work(), ttl=30, cooldown=30)
    await make().reset_keyed(name, KEY)
    assert await other.share(name, KEY, Work("again"), ttl=30, cooldown=30) == "again"


async def test_followers_are_woken_by_the_leaders_completion_not_by_their_recheck(
    make: Callable[..., MemoryStore], name: str
) -> None:
    """Followers that recheck only every 60 s get the value as soon as the leader records it
    (on asyncio the times are real: a recheck would fail the 5 s bound)."""
    work = Work("made", delay=0.2)
    got: list[Any] = []

    async def follow() -> None:
        await work.started.wait()
        got.append(await make(recheck_interval=60).share(name, KEY, Work("never"), ttl=30))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(follow)
            got.append(await make().share(name, KEY, work, ttl=30))
    assert got == ["made"] * 4
    assert work.runs == 1


async def test_past_refresh_one_process_makes_the_value_again_while_the_others_get_the_old_one(
    make: Callable[..., MemoryStore], name: str
) -> None:
    a, b, c = make(), make(), make()
    assert await a.share(name, KEY, Work("old"), ttl=30, refresh=0.3) == "old"
    await anyio.sleep(0.4)
    new = Work("new", delay=0.3)
    others = Work("never")
    got: list[Any] = []

    async def other(store: MemoryStore) -> None:
        await new.started.wait()
        got.append(await store.share(name, KEY, others, ttl=30, refresh=0.3))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other, b)
            tg.start_soon(other, c)
            assert await a.share(name, KEY, new, ttl=30, refresh=0.3) == "new"
    assert got == ["old", "old"]  # served at once while the refresh ran elsewhere
    assert (new.runs, others.runs) == (1, 0)
    assert await b.share(name, KEY, others, ttl=30, refresh=0.3) == "new"
    assert others.runs == 0


async def test_a_value_expires_after_its_ttl(make: Callable[..., MemoryStore], name: str) -> None:
    a, b = make(), make()
    assert await a.share(name, KEY, Work("first"), ttl=0.3) == "first"
    assert await b.share(name, KEY, Work("unused"), ttl=0.3) == "first"
    await anyio.sleep(0.5)
    assert await b.share(name, KEY, Work("second"), ttl=0.3) == "second"


async def test_a_reset_elsewhere_makes_every_other_process_and_loop_forget(
    make: Callable[..., MemoryStore], name: str
) -> None:
    holder, cli = make(), make()
    forgotten: list[tuple[str, str | None]] = []
    holder.attach(lambda n, k: forgotten.append((n, k)))
    cli.attach(lambda n, k: forgotten.append(("cli itself", k)))
    await holder.share(name, KEY, Work(), ttl=30)
    await holder.share(name, UNKEYED, Work(), ttl=None)
    await cli.reset_keyed(name, KEY)
    await cli.reset(name)
    await cli.reset_keyed(name, None)
    await cli.share(name, KEY, Work(), ttl=30)  # the cli listens now: it skips its own resets
    await cli.reset_keyed(name, KEY)
    assert forgotten == [(name, KEY), (name, None), (name, None), (name, KEY)]


async def test_a_follower_waiting_longer_than_wait_timeout_fails_naming_the_holder(
    make: Callable[..., MemoryStore], name: str
) -> None:
    await make().claim(name, KEY, lease=60, refresh=None, holder="pid 7 on web-1")
    with anyio.fail_after(5), pytest.raises(WaitTimeoutError) as info:
        await make(wait_timeout=0.5).share(name, KEY, Work(), ttl=30)
    assert info.value.holder == "pid 7 on web-1"
    assert 0.5 <= info.value.waited < 2


async def test_a_leader_whose_lease_is_taken_is_cancelled_and_records_nothing(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    work = Work("late", delay=30)
    leader = make(lease=0.3)

    async def steal() -> None:
        await work.started.wait()
        server.records[name, KEY].token = -1  # another process's lease now

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(steal)
            with pytest.raises(LeaseLostError, match="another process took it"):
                await leader.share(name, KEY, work, ttl=30)
    assert server.records[name, KEY].value is None


async def test_under_raise_a_lease_gone_at_completion_is_lost_and_records_nothing(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    """Taken between the last renewal and complete(): complete() records nothing, the leader
    gets LeaseLostError."""

    async def work() -> str:
        server.records[name, KEY].token = -1  # another process's lease now, before any renewal
        return "made"

    with pytest.raises(LeaseLostError, match="the lease expired or another took it"):
        await make().share(name, KEY, work, ttl=30, on_error="raise")
    assert server.records[name, KEY].value is None


@pytest.mark.parametrize("on_error", ["local", "fail"])
async def test_under_local_or_fail_a_lease_gone_at_completion_serves_the_value_unrecorded(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str, on_error: str
) -> None:
    async def work() -> str:
        server.records[name, KEY].token = -1
        return "made"

    assert await make().share(name, KEY, work, ttl=30, on_error=on_error) == "made"
    assert server.records[name, KEY].value is None


async def test_a_leader_cut_off_from_the_store_for_a_whole_lease_loses_it(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    work = Work("late", delay=30)

    async def outage() -> None:
        await work.started.wait()
        server.down = True

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(outage)
            with pytest.raises(LeaseLostError, match="could not be reached for a whole lease"):
                await make(lease=0.3).share(name, KEY, work, ttl=30)


async def test_under_raise_a_store_unreachable_at_the_first_contact_fails_at_once(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    server.down = True
    work = Work()
    with pytest.raises(StoreUnavailableError) as info:
        await make().share(name, KEY, work, ttl=30, on_error="raise")
    assert isinstance(info.value, BackendError)
    assert work.runs == 0


async def test_under_raise_followers_ride_out_an_outage_and_get_the_leaders_value(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    work = Work("made", delay=1.0)
    follower_work = Work("never")
    got: list[Any] = []

    async def outage() -> None:
        await work.started.wait()
        await anyio.sleep(0.1)
        server.down = True
        await anyio.sleep(0.5)  # shorter than the lease: the leader keeps it
        server.down = False

    async def follow() -> None:
        await work.started.wait()
        got.append(await make().share(name, KEY, follower_work, ttl=30, on_error="raise"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(outage)
            tg.start_soon(follow)
            got.append(await make(lease=2).share(name, KEY, work, ttl=30))
    assert got == ["made", "made"]
    assert follower_work.runs == 0


async def test_under_local_an_outage_makes_values_here_warns_once_and_recovers(
    make: Callable[..., MemoryStore],
    server: MemoryServer,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Store down: each call makes its value in this process (the core's single-flight keeps
    it to one per key), one WARNING for the outage, fell_back() each time; the first call
    after the store answers is fleet-wide again (recorded, served to the others)."""
    store, other = make(), make()
    fallbacks: list[int] = []
    server.down = True
    caplog.set_level(logging.INFO, "fastapi_once")
    for n in range(3):
        value = await store.share(
            name, KEY, Work(n), ttl=30, on_error="local", fell_back=lambda: fallbacks.append(1)
        )
        assert value == n
    warnings = [r for r in ours(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].event == "backend_fallback"  # type: ignore[attr-defined]
    assert len(fallbacks) == 3
    server.down = False
    assert await store.share(name, KEY, Work("shared"), ttl=30, on_error="local") == "shared"
    assert await other.share(name, KEY, Work("unused"), ttl=30) == "shared"
    assert [r.event for r in ours(caplog)][-1] == "backend_recovered"  # type: ignore[attr-defined]
    server.down = True  # the next outage warns once again
    for _ in range(2):
        assert await store.share(name, "cd" * 20, Work(), ttl=30, on_error="local") == "v"
    warnings = [r for r in ours(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 2


async def test_a_stalled_store_is_an_outage_after_wait_timeout(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    """A server that accepts and never answers: no call waits past wait_timeout."""
    server.stalled = True
    store = make(wait_timeout=0.5)
    with anyio.fail_after(0.5 + 1):
        with pytest.raises(StoreUnavailableError, match="no answer within"):
            await store.share(name, KEY, Work(), ttl=30, on_error="raise")
        assert await store.share(name, KEY, Work("here"), ttl=30, on_error="local") == "here"
    with anyio.fail_after(0.5 + 1), pytest.raises(StoreUnavailableError):
        await store.reset_keyed(name, KEY)


async def test_under_local_a_value_made_while_the_store_went_away_is_served_unrecorded(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    work = Work("made", delay=0.2)

    async def outage() -> None:
        await work.started.wait()
        server.down = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(outage)
        assert await make().share(name, KEY, work, ttl=30, on_error="local") == "made"
    server.down = False
    assert server.records[name, KEY].value is None


async def test_a_value_that_is_not_json_is_refused_and_cools_down_as_a_failure(
    make: Callable[..., MemoryStore], name: str
) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        await make().share(name, KEY, Work(object()), ttl=30, cooldown=30)
    with pytest.raises(OnceCoolingDownError):
        await make().share(name, KEY, Work(), ttl=30, cooldown=30)


async def test_a_value_over_max_value_bytes_is_refused(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    with pytest.raises(ValueError, match="over the limit of 10 bytes") as info:
        await make(max_value_bytes=10).share(name, KEY, Work("x" * 20), ttl=30)
    assert f"{name}[#{KEY[:8]}]'s result is 22 bytes" in str(info.value)
    assert "max_value_bytes=" in str(info.value)
    assert server.records[name, KEY].value is None
    work = Work("x" * 20)  # nothing was recorded: the next process runs it again
    with pytest.raises(ValueError, match="over the limit"):
        await make(max_value_bytes=10).share(name, KEY, work, ttl=30)
    assert work.runs == 1


async def test_cancelling_a_call_at_any_store_call_leaves_no_lease_nor_watch(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    """Cancelled at its n-th store call, for every n a call makes: no lease stays held, no
    watch stays registered, and the next call leads at once."""
    blocker = make()
    n = 0
    while True:
        n += 1
        key = f"{n:040x}"
        # Another process leads first and completes soon: the call claims, watches, waits,
        # claims again and gets the value: every kind of store call.
        lease = await blocker.claim(name, key, lease=5, refresh=None, holder="other")
        assert isinstance(lease, Lease)
        start = server.calls
        finished = False

        async def release(lease: Lease = lease) -> None:
            await anyio.sleep(0.1)
            await blocker.abandon(lease, cooldown=None)

        async with anyio.create_task_group() as tg:
            tg.start_soon(release)
            with anyio.CancelScope() as scope:

                def cancel_at(call: int, target: int = start + n) -> None:
                    if call == target:
                        scope.cancel()

                server.on_call = cancel_at
                await make().share(name, key, Work(delay=0.1), ttl=30)
                finished = True
        server.on_call = None
        assert not any(server.watches.values())
        record = server.live((name, key))
        assert record.token is None
        if finished:
            break
    assert n > 3  # claim, claim again, renew or complete...


async def test_cancelling_the_leaders_work_frees_the_lease_without_a_cooldown(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    work = Work(delay=30)
    with anyio.move_on_after(0.2):
        await make().share(name, KEY, work, ttl=30, cooldown=30)
    assert work.runs == 1
    assert await make().share(name, KEY, Work("next"), ttl=30, cooldown=30) == "next"


async def test_the_value_travels_as_json(make: Callable[..., MemoryStore], name: str) -> None:
    value = {"a": [1, 2.5, None, True], "b": "é"}
    assert await make().share(name, KEY, Work(value), ttl=30) == value
    assert json.loads(json.dumps(value)) == await make().share(name, KEY, Work(), ttl=30)


async def test_an_unkeyed_once_without_a_ttl_records_its_value_for_the_backends_ttl(
    make: Callable[..., MemoryStore], server: MemoryServer, name: str
) -> None:
    """The backend's ttl= is the default life of an unkeyed once's record; the once's own
    ttl= comes first."""

    @once(across=make(ttl=30), name=name)
    async def setup() -> str:
        return "v"

    @once(across=make(ttl=30), name=name + ".own", ttl=5)
    async def own() -> str:
        return "v"

    now = anyio.current_time()
    assert (await setup(), await own()) == ("v", "v")
    lives = {n: r.expires - now for (n, _), r in server.records.items() if r.expires is not None}
    assert sorted(lives) == sorted(n for n, _ in server.records)  # both records expire
    assert sorted(round(life) for life in lives.values()) == [5, 30]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1024"])
def test_max_value_bytes_is_a_positive_whole_number_or_none(bad: Any) -> None:
    """A bad max_value_bytes= is a ValueError naming the store, the option and the value."""
    with pytest.raises(ValueError, match=rf"MemoryStore\(max_value_bytes={bad!r}\): give a whole"):
        MemoryStore(MemoryServer(), max_value_bytes=bad)
    assert MemoryStore(MemoryServer(), max_value_bytes=None).max_value_bytes is None
