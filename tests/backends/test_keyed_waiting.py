"""Keyed followers wait without holding a connection: one listener per process and loop.

A leader process holds 50 keys; a second process calls each of them from 10 callers. While
they wait, the second process holds the listener and at most a few pooled connections (counted
by the server: ``pg_stat_activity``, ``CLIENT LIST``), and every caller gets the value when the
leader finishes. A server restart while they wait does not strand them: the listener
reconnects and wakes them.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_servers import PostgresServer, RedisServer, read_log, require, wait_for
from spawner import Spawner
from test_keyed_fleet import Process

pytestmark = pytest.mark.kinds("redis", "postgres")

KEYS = [f"/k{i}" for i in range(50)]
BOUND = 1 + 8 + 1  # the listener, the pooled connections for reads, one being replaced


@pytest.fixture
def processes(tmp_path: Path, spawner: Spawner) -> Iterator[Callable[..., Process]]:
    """Start keyed worker processes sharing one once name and log; kill them afterwards."""
    started: list[Process] = []
    name = f"tests.waiting.get_stuff@{secrets.token_hex(4)}"

    def start(spec: dict[str, Any], **config: Any) -> Process:
        process = Process(
            spawner, {"spec": spec, "log": str(tmp_path / "events.log"), "name": name, **config}
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
        process.proc.communicate()


def connections_of(spec: dict[str, Any], pid: int, client_name: str) -> int:
    """How many connections the server counts for the process ``pid`` (PostgreSQL: by its
    application_name; Redis: by the client name its URL sets)."""
    if spec["kind"] == "redis":
        redis = require("redis")
        client = redis.Redis.from_url(spec["url"])
        try:
            return sum(1 for c in client.client_list() if c.get("name") == client_name)
        finally:
            client.close()
    asyncpg = require("asyncpg")

    async def count() -> int:
        conn = await asyncpg.connect(spec["dsn"])
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    f"fastapi_once pid {pid} on {socket.gethostname()}"[:63],
                )
            )
        finally:
            await conn.close()

    return asyncio.run(count())


def waiting_spec(spec: dict[str, Any], client_name: str) -> dict[str, Any]:
    """``spec`` for the waiting process: on Redis, its connections named ``client_name``."""
    if spec["kind"] == "redis":
        return {**spec, "url": f"{spec['url']}?client_name={client_name}"}
    return spec


def test_many_waiting_callers_of_many_keys_hold_a_bounded_number_of_connections(
    spec: dict[str, Any],
    tmp_path: Path,
    processes: Callable[..., Process],
    kind: str,
    record_figure: Callable[[str], None],
) -> None:
    """50 keys x 10 callers wait on another process's leaders: the waiting process holds at
    most the listener and a few pooled connections, and every caller gets the one run's value."""
    client_name = "waiting" + secrets.token_hex(3)
    leader = processes(spec, sleep=4.0)
    waiting = processes(waiting_spec(spec, client_name), backend={"recheck_interval": 30})
    log = tmp_path / "events.log"
    leader.send({"call": KEYS})
    wait_for(lambda: len(read_log(log)) >= len(KEYS), what="the leader to start every key")
    waiting.send({"call": KEYS, "each": 10})
    most = 0
    until = time.monotonic() + 2.0  # the leader works for 4 s: they all wait meanwhile
    while time.monotonic() < until:
        most = max(most, connections_of(spec, waiting.proc.pid, client_name))
        time.sleep(0.1)
    assert most <= BOUND, f"{most} connections while waiting"
    record_figure(f"{kind}: 50 keys x 10 callers waiting in one process: {most} connections")
    assert all(r[0]["ok"]["run"] == 1 for r in leader.reply()["results"])
    results = waiting.reply()["results"]
    assert [[o["ok"]["url"] for o in r] for r in results] == [[k] * 10 for k in KEYS]
    assert all(o["ok"]["run"] == 1 for r in results for o in r)
    starts = [e for e in read_log(log) if e["event"] == "start"]
    assert sorted(e["url"] for e in starts) == sorted(KEYS)


@pytest.fixture
def private_server(kind: str, request: pytest.FixtureRequest) -> RedisServer | PostgresServer:
    """A server of this test's own, to restart."""
    name = "private_redis" if kind == "redis" else "private_postgres"
    server: RedisServer | PostgresServer = request.getfixturevalue(name)
    return server


def test_waiting_callers_are_woken_after_the_listener_reconnects_to_a_restarted_server(
    spec: dict[str, Any],
    tmp_path: Path,
    processes: Callable[..., Process],
    private_server: RedisServer | PostgresServer,
    kind: str,
) -> None:
    """The server restarts while callers wait (recheck_interval=120, no wait_timeout, so only
    a wake-up ends their wait within the test's timeout): the listener reconnects and wakes
    them, so they get the value of the run that follows."""
    if isinstance(private_server, RedisServer):
        spec = {**spec, "url": private_server.url}
    else:
        spec = {**spec, "dsn": private_server.dsn}
    options = {"recheck_interval": 120, "wait_timeout": None}
    leader = processes(spec, sleep=2.0, backend=options)
    waiting = processes(spec, sleep=0.5, backend=options)
    log = tmp_path / "events.log"
    leader.send({"call": ["/a"]})
    wait_for(lambda: len(read_log(log)) >= 1, what="the leader to start")
    waiting.send({"call": ["/a"], "each": 3})
    time.sleep(0.5)  # they wait
    private_server.restart()
    results = waiting.reply()["results"]
    assert all("ok" in o for o in results[0]), results
    leader.reply()
