"""A keyed leader that loses its lock, and followers that outlive a server restart, in one process.

As in test_keyed_shared.py, two backend instances stand for two processes.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from backend_servers import PostgresServer, RedisServer, require
from backend_worker import build_backend as build
from test_keyed_shared import key, value

from fastapi_once.backends import Backend, BackendError, LeaseLostError

pytestmark = pytest.mark.anyio


@pytest.fixture
def name() -> str:
    """A once name of the test's own."""
    return f"tests.leases.get_stuff@{secrets.token_hex(4)}"


async def take_the_lock_away(spec: dict[str, Any], name: str, digest: str) -> None:
    """Behind the leader's back: delete the key's lock (Redis, by the documented key layout),
    or end the session holding it (PostgreSQL)."""
    if spec["kind"] == "redis":
        redis = require("redis.asyncio")
        client = redis.Redis.from_url(spec["url"])
        try:
            await client.delete(f"{spec['namespace']}:k:{{{name}:{digest}}}:lock")
        finally:
            await client.aclose()
        return
    asyncpg = require("asyncpg")
    conn = await asyncpg.connect(spec["dsn"])
    try:
        # The store's sessions holding an advisory lock: the leader's only (this worker's
        # server runs one test at a time; a lock session's last query may be a renewal's, which
        # names no table).
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a "
            "JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
            "WHERE a.pid <> pg_backend_pid() AND a.application_name LIKE 'fastapi_once%'"
        )
    finally:
        await conn.close()
    assert ended >= 1


@pytest.mark.kinds("redis", "postgres", "postgres-xact")
async def test_a_keyed_leader_that_loses_its_lock_is_cancelled_and_records_nothing(
    make: Callable[..., Backend], spec: dict[str, Any], name: str
) -> None:
    """LeaseLostError names the once; the work is cancelled; no value and no cooldown are
    recorded, so the other instance runs the work itself."""
    leader = make(check_interval=0.1) if spec["kind"] != "redis" else make(lease=0.3)
    other = make()
    digest = key(name, "/a")
    cancelled = False

    async def work() -> str:
        nonlocal cancelled
        await take_the_lock_away(spec, name, digest)
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise
        return "never"  # pragma: no cover - cancelled

    with anyio.fail_after(10), pytest.raises(LeaseLostError) as info:
        await leader.run_keyed(name, digest, work, ttl=60, cooldown=30)
    assert cancelled
    assert name in str(info.value)
    assert await other.run_keyed(name, digest, value("ran"), ttl=60, cooldown=30) == "ran"


@pytest.fixture
def private_spec(kind: str, request: pytest.FixtureRequest) -> tuple[dict[str, Any], Any]:
    """A spec on a server of the test's own (which it restarts), and that server."""
    if kind == "redis":
        redis_server: RedisServer = request.getfixturevalue("private_redis")
        spec = {"kind": kind, "url": redis_server.url, "namespace": "t", "lease": 1.0}
        return spec, redis_server
    pg: PostgresServer = request.getfixturevalue("private_postgres")
    return {"kind": kind, "dsn": pg.dsn, "table": "t", "lock": "session"}, pg


@pytest.mark.kinds("redis", "postgres")
@pytest.mark.parametrize("recheck", [60, 0.05], ids=["woken", "rechecking"])
async def test_a_follower_rides_out_a_server_restart_and_gets_a_value(
    private_spec: tuple[dict[str, Any], RedisServer | PostgresServer], name: str, recheck: float
) -> None:
    """The server restarts while a follower waits: it gets a value — the leader's, or its
    own run's if the leader's record or lock went with the restart — instead of an error.
    With recheck_interval=60 the listener, reconnected, must wake it; with 0.05 it checks
    while the server is down and rides out the refused connections."""
    spec, server = private_spec
    options = {"recheck_interval": recheck, "wait_timeout": 30}
    leader, follower = build(spec, **options), build(spec, **options)
    digest = key(name, "/a")
    started, release = anyio.Event(), anyio.Event()
    outcome: list[Any] = []

    async def slow() -> str:
        started.set()
        await release.wait()
        return "leader"

    async def lead() -> None:
        # The restart may take the leader's lock or connection.
        with contextlib.suppress(BackendError, LeaseLostError):
            await leader.run_keyed(name, digest, slow, ttl=60)

    async def follow() -> None:
        outcome.append(await follower.run_keyed(name, digest, value("follower"), ttl=60))

    try:
        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lead)
                await started.wait()
                tg.start_soon(follow)
                await anyio.sleep(0.3)  # the follower waits
                await anyio.to_thread.run_sync(server.restart)
                release.set()
    finally:
        await leader.aclose()
        await follower.aclose()
    assert outcome in (["leader"], ["follower"])
