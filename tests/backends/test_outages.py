"""Redis and PostgreSQL going away while a leader works and followers wait.

A restart shorter than ``wait_timeout`` fails only the leader, whose lock is gone: the followers
reconnect, one of them leads with a larger fencing token, and every other process gets its
result. A server that stays away fails everyone within ``wait_timeout``, never a hang.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from backend_servers import PostgresServer, RedisServer, Worker, read_log, wait_for

from fastapi_once.backends import Backend, BackendError, LeaseLostError


def restart_mid_work(
    server: RedisServer | PostgresServer,
    spec: dict[str, Any],
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    down: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Three processes call a once; the server restarts while the first leader works."""
    log = tmp_path / "events.log"
    cfg = {
        "spec": spec,
        "log": str(log),
        "name": f"tests.outage@{secrets.token_hex(4)}",
        "result": 7,
        "first_sleep": 30,
        "options": {"wait_timeout": 20},
    }
    workers = start_workers(3, cfg)
    for worker in workers:
        worker.go()
    wait_for(lambda: any(e["event"] == "start" for e in read_log(log)), what="the leader")
    time.sleep(0.3)  # the followers are waiting
    if isinstance(server, PostgresServer):
        server.halt()
        time.sleep(down)
        server.start()
    else:
        server.stop()
        time.sleep(down)
        server.start()
    outcomes = [worker.outcome(timeout=40) for worker in workers]
    return outcomes, [e for e in read_log(log) if e["event"] == "start"]


def check_takeover(
    outcomes: list[dict[str, Any]],
    starts: list[dict[str, Any]],
    pw: str,
    figure: Callable[[str], None],
    kind: str,
) -> None:
    first, second = starts
    figure(
        f"{kind}: restarted mid-work; fencing tokens {first['fence']} then {second['fence']}; "
        f"the followers' leader started {second['t'] - first['t']:.2f} s after the first"
    )
    leader = next(o for o in outcomes if o["pid"] == first["pid"])
    assert leader["error"] == "LeaseLostError", outcomes
    assert pw not in leader["message"]
    others = [o for o in outcomes if o is not leader]
    assert [o.get("ok") for o in others] == [7, 7], outcomes
    assert second["pid"] != first["pid"]
    assert second["fence"] > first["fence"], starts


@pytest.mark.timeout(90)
def test_followers_ride_out_a_redis_restart_and_the_next_leader_has_a_larger_fencing_token(
    private_redis: RedisServer,
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    record_figure: Callable[[str], None],
) -> None:
    """Redis restarts and loses every key (the fencing counter too) while a leader works: the
    leader fails with LeaseLostError, a follower leads with a larger token, all others get its
    result."""
    spec = {"kind": "redis", "url": private_redis.url, "namespace": "outage", "lease": 1.0}
    outcomes, starts = restart_mid_work(private_redis, spec, tmp_path, start_workers, down=1.5)
    check_takeover(outcomes, starts, private_redis.password, record_figure, "redis")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("lock", ["session", "transaction"])
def test_followers_ride_out_a_postgres_restart_and_the_next_leader_has_a_larger_fencing_token(
    private_postgres: PostgresServer,
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    record_figure: Callable[[str], None],
    lock: str,
) -> None:
    """PostgreSQL restarts while a leader works: its session (and lock) ends, so it fails with
    LeaseLostError; the followers reconnect, one leads with a larger token from the durable
    sequence, and all others get its result; one marker row."""
    spec = {"kind": "postgres", "dsn": private_postgres.dsn, "table": "outage", "lock": lock}
    outcomes, starts = restart_mid_work(private_postgres, spec, tmp_path, start_workers, down=1.5)
    check_takeover(outcomes, starts, private_postgres.password, record_figure, f"postgres-{lock}")


def build(kind: str, server: RedisServer | PostgresServer, **options: Any) -> Backend:
    if kind == "redis":
        from fastapi_once.backends import RedisBackend

        assert isinstance(server, RedisServer)
        return RedisBackend(server.url, lease=0.5, **options)
    from fastapi_once.backends import PostgresBackend

    assert isinstance(server, PostgresServer)
    return PostgresBackend(server.dsn, check_interval=0.2, connect_timeout=2, **options)


@pytest.mark.anyio
@pytest.mark.kinds("redis", "postgres")
async def test_a_server_that_stays_away_fails_the_leader_and_the_followers_within_wait_timeout(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The server stops for good: the leader gets LeaseLostError, a follower BackendError once
    wait_timeout has passed; no hang, no password."""
    server = request.getfixturevalue(f"private_{kind}")
    name = f"tests.gone@{secrets.token_hex(4)}"
    leader, follower = build(kind, server), build(kind, server, wait_timeout=2)
    started = anyio.Event()
    errors: dict[str, BaseException] = {}

    async def work() -> str:
        started.set()
        await anyio.sleep(60)
        return "never"

    async def lead() -> None:
        with pytest.raises(LeaseLostError) as info:
            await leader.run_once(name, work)
        errors["leader"] = info.value

    async def follow() -> None:
        with pytest.raises(BackendError) as info:
            await follower.run_once(name, work)
        errors["follower"] = info.value

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await started.wait()
            tg.start_soon(follow)
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(server.halt if kind == "postgres" else server.stop)
    for error in errors.values():
        assert server.password not in str(error)
    assert follower.describe() in str(errors["follower"])
    await leader.aclose()
    await follower.aclose()


@pytest.mark.anyio
@pytest.mark.kinds("redis", "postgres")
async def test_a_lost_lock_stops_def_work_at_once_and_its_late_result_is_never_recorded(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The lock goes while a ``def`` runs in its thread: the caller gets LeaseLostError while the
    thread is still blocked (it cannot be interrupted, so it is abandoned); what the thread
    returns later is dropped, and the next call runs the work again."""
    from fastapi_once import once

    server = request.getfixturevalue(f"{kind}_server")
    name = f"tests.lost.def@{secrets.token_hex(4)}"
    backend = build(
        kind,
        server,
        **(
            {"table": "t" + secrets.token_hex(6)}
            if kind != "redis"
            else {"namespace": "t" + secrets.token_hex(6)}
        ),
    )
    inside, release, returned = threading.Event(), threading.Event(), threading.Event()

    def migrate() -> str:
        inside.set()
        release.wait(30)
        returned.set()
        return "late"

    slow = once(migrate, across=backend, name=name)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(LeaseLostError):
                    await slow()

            tg.start_soon(call)
            await anyio.to_thread.run_sync(inside.wait)
            await take_the_lock_away(kind, server, backend, name)
        assert not returned.is_set()
    release.set()
    await anyio.to_thread.run_sync(returned.wait)
    await anyio.sleep(0.2)

    async def fresh() -> str:
        return "fresh"

    assert await backend.run_once(name, fresh) == "fresh"
    await backend.aclose()


async def take_the_lock_away(
    kind: str, server: RedisServer | PostgresServer, backend: Backend, name: str
) -> None:
    """Delete the Redis lock key, or end the PostgreSQL session that holds the lock."""
    if kind == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(server.url)
        await client.delete(backend._keys(name, "-", "lock")[0])  # type: ignore[attr-defined]
        await client.aclose()
        return
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'fastapi_once %' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
