"""The behaviour every backend shares, checked in one process against the real store.

Two backend instances in one process stand for two processes: each takes its own lock (its own
open file, Redis token, or database session).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from backend_servers import secret_of
from backend_worker import build_backend

from fastapi_once import OnceError, once
from fastapi_once.backends import Backend, WaitTimeoutError

# The lease algorithm's behaviours are tested in test_lease.py and by every store in
# store_contract.py; here they run end to end through once() on the file store (asyncio and
# trio). What depends on a store's own primitives or options runs on every kind.
pytestmark = [pytest.mark.anyio, pytest.mark.kinds("file")]
EVERY_KIND = pytest.mark.kinds("file", "redis", "postgres", "postgres-xact")


@pytest.fixture
async def backend(spec: dict[str, Any]) -> AsyncIterator[Backend]:
    made = build_backend(spec)
    yield made
    await made.aclose()


@pytest.fixture
def name() -> str:
    return f"tests.contract.job@{secrets.token_hex(4)}"


class Counter:
    """A work function that counts its runs and returns ``result``."""

    def __init__(self, result: Any = "done", *, delay: float = 0, error: Exception | None = None):
        self.result = result
        self.delay = delay
        self.error = error
        self.runs = 0
        self.started = anyio.Event()

    async def __call__(self) -> Any:
        self.runs += 1
        self.started.set()
        await anyio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.result


@contextlib.asynccontextmanager
async def held_lock(spec: dict[str, Any], name: str) -> AsyncIterator[None]:
    """Hold ``name``'s lock the way another process would, behind the backend's back."""
    kind = spec["kind"]
    if kind == "file":
        from fastapi_once.backends._file import _file_key

        path = os.path.join(spec["directory"], f"{_file_key(name)}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)
    elif kind == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(spec["url"])
        key = f"{spec['namespace']}:{{{name}}}:lock"
        await client.set(key, "someone else", px=10_000)
        try:
            yield
        finally:
            await client.delete(key)
            await client.aclose()
    else:
        from fastapi_once.backends import PostgresBackend
        from fastapi_once.backends._store import UNKEYED, Lease

        # Another process refreshing the value: its lease is the record's advisory lock.
        other = build_backend(spec)
        assert isinstance(other, PostgresBackend)
        lease = await other.claim(name, UNKEYED, lease=10, refresh=1e-6, holder="someone else")
        assert isinstance(lease, Lease)
        try:
            yield
        finally:
            await other.abandon(lease, cooldown=None)
            await other.aclose()


async def test_the_leader_runs_the_work_and_gets_its_result_as_json_decodes_it(
    backend: Backend, name: str
) -> None:
    """The leader's return value is the JSON round trip of its result (a tuple becomes a list)."""
    work = Counter({"rows": (1, 2), "ok": True, "none": None})
    assert await backend.run_once(name, work) == {"rows": [1, 2], "ok": True, "none": None}
    assert work.runs == 1


async def test_a_recorded_result_is_returned_without_running_the_work_again(
    backend: Backend, name: str
) -> None:
    """Once a result is recorded, every later call returns it and the work does not run."""
    first, second = Counter(41), Counter(42)
    assert await backend.run_once(name, first) == 41
    assert await backend.run_once(name, second) == 41
    assert (first.runs, second.runs) == (1, 0)


@EVERY_KIND
async def test_a_recorded_result_is_read_without_taking_the_lock(
    spec: dict[str, Any], backend: Backend, name: str
) -> None:
    """The fast path reads the marker first: a lock held by someone else does not delay it."""
    await backend.run_once(name, Counter("recorded"))
    impatient = build_backend(spec, wait_timeout=0.2)
    try:
        async with held_lock(spec, name):
            with anyio.fail_after(5):
                assert await impatient.run_once(name, Counter("again")) == "recorded"
    finally:
        await impatient.aclose()


async def test_a_failing_work_records_nothing_and_the_next_call_runs_it_again(
    backend: Backend, name: str
) -> None:
    """The work's exception reaches the caller unchanged; no marker is written."""
    error = ValueError("migration failed")
    with pytest.raises(ValueError, match="migration failed") as info:
        await backend.run_once(name, Counter(error=error))
    assert info.value is error
    retry = Counter("second try")
    assert await backend.run_once(name, retry) == "second try"
    assert retry.runs == 1


async def test_a_result_that_is_not_json_is_refused_naming_the_once_and_the_type(
    backend: Backend, name: str
) -> None:
    """No pickle: a result JSON cannot carry raises TypeError, and nothing is recorded."""
    with pytest.raises(TypeError, match="not JSON-serialisable") as info:
        await backend.run_once(name, Counter({"when": object()}))
    assert name in str(info.value)
    assert "dict containing a object" in str(info.value)
    assert backend.describe() in str(info.value)
    retry = Counter([1])
    assert await backend.run_once(name, retry) == [1]
    assert retry.runs == 1


async def test_a_marker_expires_after_its_ttl(backend: Backend, name: str) -> None:
    """With ttl=, the result is shared until the marker expires; then the work runs again."""
    work = Counter("fresh")
    assert await backend.run_once(name, work, ttl=0.4) == "fresh"
    assert await backend.run_once(name, work, ttl=0.4) == "fresh"
    assert work.runs == 1
    await anyio.sleep(0.6)
    assert await backend.run_once(name, work, ttl=0.4) == "fresh"
    assert work.runs == 2


@EVERY_KIND
async def test_the_backends_ttl_option_is_the_default_ttl(spec: dict[str, Any], name: str) -> None:
    """``ttl=`` on the backend applies when run_once is given none."""
    backend = build_backend(spec, ttl=0.3)
    try:
        work = Counter("x")
        await backend.run_once(name, work)
        await anyio.sleep(0.5)
        await backend.run_once(name, work)
        assert work.runs == 2
    finally:
        await backend.aclose()


async def test_reset_makes_the_next_call_run_the_work_again(backend: Backend, name: str) -> None:
    """reset(name) clears the marker; reset of a name never run is harmless."""
    work = Counter("v1")
    await backend.run_once(name, work)
    await backend.reset(name)
    await backend.reset(name)
    await backend.reset(name + "-never-run")
    assert await backend.run_once(name, work) == "v1"
    assert work.runs == 2


async def test_a_new_version_is_a_new_identity(backend: Backend, name: str) -> None:
    """The name (with its @version) is the identity: another name runs the work again."""
    work = Counter("x")
    await backend.run_once(f"{name}@1", work)
    await backend.run_once(f"{name}@1", work)
    await backend.run_once(f"{name}@2", work)
    assert work.runs == 2


async def test_a_follower_waits_for_the_leader_and_returns_its_result(
    spec: dict[str, Any], backend: Backend, name: str
) -> None:
    """A second process that arrives mid-run waits (never skips) and gets the leader's result."""
    other = build_backend(spec)
    leader, follower = Counter(["leader"], delay=0.5), Counter(["follower"])
    results: dict[str, Any] = {}

    async def lead() -> None:
        results["leader"] = await backend.run_once(name, leader)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await leader.started.wait()
            results["follower"] = await other.run_once(name, follower)
    finally:
        await other.aclose()
    assert results == {"leader": ["leader"], "follower": ["leader"]}
    assert (leader.runs, follower.runs) == (1, 0)


async def test_when_the_leader_fails_a_waiting_follower_runs_the_work(
    spec: dict[str, Any], backend: Backend, name: str
) -> None:
    """The lock is released on failure without a marker, so the follower becomes leader."""
    other = build_backend(spec)
    leader = Counter(delay=0.3, error=RuntimeError("leader failed"))
    follower = Counter("follower's")
    results: dict[str, Any] = {}

    async def lead() -> None:
        with pytest.raises(RuntimeError, match="leader failed"):
            await backend.run_once(name, leader)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await leader.started.wait()
            results["follower"] = await other.run_once(name, follower)
    finally:
        await other.aclose()
    assert results == {"follower": "follower's"}
    assert follower.runs == 1


async def test_a_follower_gives_up_after_wait_timeout_naming_the_backend_and_the_holder(
    spec: dict[str, Any], backend: Backend, name: str
) -> None:
    """WaitTimeoutError is a TimeoutError and a OnceError; it says where and who, no secrets."""
    impatient = build_backend(spec, wait_timeout=0.3)
    leader = Counter("slow", delay=1.0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(backend.run_once, name, leader)
            await leader.started.wait()
            began = time.monotonic()
            with pytest.raises(WaitTimeoutError) as info:
                await impatient.run_once(name, Counter("never"))
            waited = time.monotonic() - began
        assert await impatient.run_once(name, Counter("never")) == "slow"
    finally:
        await impatient.aclose()
    error = info.value
    assert isinstance(error, TimeoutError)
    assert isinstance(error, OnceError)
    message = str(error)
    assert impatient.describe() in message
    assert name in message
    assert f"pid {os.getpid()}" in message, message
    secret = secret_of(spec)
    assert secret is None or secret not in message
    assert waited < 0.9


async def test_concurrent_callers_in_one_process_share_one_run_once_call(
    spec: dict[str, Any], backend: Backend
) -> None:
    """The in-process single-flight comes first: many callers, one run_once, one run."""
    calls = 0

    class Counting(Backend):
        async def run_once(
            self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
        ) -> Any:
            nonlocal calls
            calls += 1
            return await backend.run_once(name, work, ttl=ttl)

        async def reset(self, name: str) -> None:
            await backend.reset(name)

        def describe(self) -> str:
            return backend.describe()

    runs = 0

    async def migrate() -> dict[str, int]:
        nonlocal runs
        runs += 1
        await anyio.sleep(0.1)
        return {"version": 7}

    shared = once(migrate, across=Counting(), name=f"tests.migrate@{secrets.token_hex(4)}")
    results: list[Any] = []

    async def call() -> None:
        results.append(await shared())

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call)
    assert results == [{"version": 7}] * 20
    assert (calls, runs) == (1, 1)


@EVERY_KIND
async def test_describe_and_repr_never_show_the_password(
    spec: dict[str, Any], backend: Backend
) -> None:
    """The URL or DSN is shown with its password masked."""
    secret = secret_of(spec)
    for shown in (backend.describe(), repr(backend), str(backend)):
        assert secret is None or secret not in shown
        assert type(backend).__name__ in shown
    if secret is not None:
        assert "***" in backend.describe()


@EVERY_KIND
def test_the_default_wait_timeout_is_finite(spec: dict[str, Any]) -> None:
    """A follower never waits forever unless asked to: 300 s by default."""
    assert build_backend(spec).wait_timeout == 300  # type: ignore[attr-defined]
    assert build_backend(spec, wait_timeout=None).wait_timeout is None  # type: ignore[attr-defined]
