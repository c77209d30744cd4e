"""A keyed once with ``across=`` in several real processes: one run per key, fleet-wide."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_servers import read_log, wait_for
from spawner import Spawner

from fastapi_once._keys import key_digest, shared_key_digest

pytestmark = pytest.mark.kinds("redis", "postgres")


class Process:
    """A running keyed_worker.py: send it commands, read its replies.

    The process starts when this is made; the first command waits until it says ``ready``
    (imported, backend built), so processes made one after another start up side by side.
    """

    def __init__(self, spawner: Spawner, config: dict[str, Any]) -> None:
        self.proc = spawner.spawn("keyed_worker", json.dumps(config))
        self.ready = False

    def wait_ready(self) -> None:
        """Wait until the process has said ``ready`` (at once if it has)."""
        if not self.ready:
            assert self.reply_line() == "ready"
            self.ready = True

    def send(self, command: dict[str, Any]) -> None:
        self.wait_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise AssertionError(f"the worker ended: {self.proc.communicate()[1][-3000:]}")
        return line.strip()

    def reply(self) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.reply_line())
        return answer

    def call(self, *urls: str, each: int = 1) -> list[list[dict[str, Any]]]:
        self.send({"call": list(urls), "each": each})
        results: list[list[dict[str, Any]]] = self.reply()["results"]
        return results

    def reset(self, url: str | None) -> None:
        self.send({"reset": url})
        assert self.reply() == {"ok": "reset"}


@pytest.fixture
def fleet(
    spec: dict[str, Any], tmp_path: Path, spawner: Spawner
) -> Iterator[Callable[..., list[Process]]]:
    """Start keyed worker processes sharing one once (same name, log and backend)."""
    started: list[Process] = []
    base = {"spec": spec, "log": str(tmp_path / "events.log"), "name": unique_name()}

    def start(n: int, **config: Any) -> list[Process]:
        made = [Process(spawner, {**base, **config}) for _ in range(n)]
        started.extend(made)
        for process in made:
            process.wait_ready()
        return made

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
        process.proc.communicate()


def unique_name() -> str:
    return f"tests.fleet.get_stuff@{secrets.token_hex(4)}"


def starts(log: Path, url: str) -> list[dict[str, Any]]:
    return [e for e in read_log(log) if e["event"] == "start" and e["url"] == url]


def log_of(spec: dict[str, Any], tmp_path: Path) -> Path:
    return tmp_path / "events.log"


def ok(outcome: dict[str, Any]) -> dict[str, Any]:
    assert "ok" in outcome, outcome
    value: dict[str, Any] = outcome["ok"]
    return value


# --- what the store holds -------------------------------------------------------------------------


def store_names(spec: dict[str, Any]) -> list[str]:
    """Every key name in the test's Redis namespace, or every (name, key) of its keyed table."""
    if spec["kind"] == "redis":
        import redis

        client = redis.Redis.from_url(spec["url"], decode_responses=True)
        try:
            return sorted(client.scan_iter(match=f"{spec['namespace']}:*"))
        finally:
            client.close()
    rows = pg_fetch(spec, f'SELECT name, key FROM "{spec["table"]}_lease"')
    return sorted(f"{r['name']} {r['key']}" for r in rows)


def pg_fetch(spec: dict[str, Any], query: str) -> list[Any]:
    import asyncpg  # type: ignore[import-untyped]

    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(spec["dsn"])
        try:
            return list(await conn.fetch(query))
        finally:
            await conn.close()

    return asyncio.run(fetch())


# --- one run per key ------------------------------------------------------------------------------


@pytest.mark.kinds("file", "redis", "postgres", "postgres-xact")
def test_each_key_runs_once_across_processes_and_every_caller_gets_its_typed_value(
    kind: str,
    spec: dict[str, Any],
    tmp_path: Path,
    fleet: Callable[..., list[Process]],
    record_figure: Callable[[str], None],
) -> None:
    """Four processes, five concurrent callers each, ten keys: each key's function ran once in
    total, and all 200 callers got that run's value as the annotated dataclass."""
    urls = [f"https://example.test/{i}" for i in range(10)]
    processes = fleet(4, sleep=0.5)
    started = time.monotonic()
    for process in processes:
        process.send({"call": urls, "each": 5})
    replies = [process.reply()["results"] for process in processes]
    took = time.monotonic() - started
    for results in replies:
        for url, outcomes in zip(urls, results, strict=True):
            assert [ok(o) for o in outcomes] == [{"url": url, "run": 1, "bytes": 0}] * 5
    log = log_of(spec, tmp_path)
    assert {url: len(starts(log, url)) for url in urls} == dict.fromkeys(urls, 1)
    record_figure(
        f"{kind}: 4 processes x 5 callers x 10 keys, 0.5 s runs: all served in {took:.2f} s"
    )


# --- faults ---------------------------------------------------------------------------------------


def test_a_killed_leaders_key_is_taken_over_by_a_waiting_process(
    kind: str,
    spec: dict[str, Any],
    tmp_path: Path,
    fleet: Callable[..., list[Process]],
    record_figure: Callable[[str], None],
) -> None:
    """SIGKILL of the process running a key: a process waiting for that key runs it (after the
    lease on Redis, at once on PostgreSQL), and a key the dead one had finished is kept."""
    leader, follower = fleet(2, sleeps={"1": 60})
    log = log_of(spec, tmp_path)
    leader.send({"call": ["slow"]})
    wait_for(lambda: bool(starts(log, "slow")), what="the leader to start")
    follower.send({"call": ["slow"]})
    time.sleep(0.3)  # the follower is waiting on the key
    killed_at = time.time()
    os.kill(leader.proc.pid, signal.SIGKILL)
    assert ok(follower.reply()["results"][0][0]) == {"url": "slow", "run": 2, "bytes": 0}
    runs = starts(log, "slow")
    assert [r["pid"] for r in runs] == [leader.proc.pid, follower.proc.pid]
    takeover = runs[1]["t"] - killed_at
    record_figure(f"{kind}: a keyed follower took over {takeover * 1000:.0f} ms after SIGKILL")
    assert takeover < spec.get("lease", 0) + 1.0 + 3  # lease + recheck_interval, generously


# --- invalidation ---------------------------------------------------------------------------------


def poll_run(process: Process, url: str, run: int) -> None:
    """Call ``url`` in ``process`` until it returns the ``run``-th run (the reset reached it)."""
    deadline = time.monotonic() + 15
    while ok(process.call(url)[0][0])["run"] != run:
        assert time.monotonic() < deadline, f"{url} was not forgotten in the live process"
        time.sleep(0.05)


@pytest.mark.kinds("file", "redis", "postgres")
def test_a_live_process_forgets_a_key_another_process_reset(
    spec: dict[str, Any], tmp_path: Path, fleet: Callable[..., list[Process]]
) -> None:
    """A process holding a and b in memory is told of reset("a") elsewhere: its next call of a
    runs it again (once), while b is still served from memory."""
    holder, admin = fleet(2)
    holder.call("a", "b")
    admin.reset("a")
    poll_run(holder, "a", 2)
    assert ok(holder.call("b")[0][0])["run"] == 1
    log = log_of(spec, tmp_path)
    assert (len(starts(log, "a")), len(starts(log, "b"))) == (2, 1)


@pytest.mark.kinds("file")  # every store's reset of a whole once: store_contract.py
def test_a_live_process_forgets_every_key_when_another_resets_the_whole_once(
    spec: dict[str, Any], tmp_path: Path, fleet: Callable[..., list[Process]]
) -> None:
    """reset() with no arguments elsewhere: the live process forgets every key of that once."""
    holder, admin = fleet(2)
    holder.call("a", "b")
    admin.reset(None)
    poll_run(holder, "a", 2)
    poll_run(holder, "b", 2)


@pytest.mark.kinds("file", "redis", "postgres", "mysql")  # every store tells the fleet of resets
def test_a_live_process_forgets_an_unkeyed_value_another_process_reset(
    spec: dict[str, Any], tmp_path: Path, fleet: Callable[..., list[Process]]
) -> None:
    """An unkeyed once's value held in memory is forgotten when another process (which never
    made it) resets the once: within a second, the holder's next call runs it again."""
    holder, admin = fleet(2, unkeyed=True)
    assert ok(holder.call("one")[0][0])["run"] == 1
    admin.reset(None)
    started = time.monotonic()
    poll_run(holder, "one", 2)
    assert time.monotonic() - started < 5  # a hang guard; the README promises 1 s
    assert len(starts(log_of(spec, tmp_path), "one")) == 2


# --- bounds ---------------------------------------------------------------------------------------


def test_key_names_in_the_store_are_digests_never_the_key(
    spec: dict[str, Any], tmp_path: Path, fleet: Callable[..., list[Process]]
) -> None:
    """A key from client data (a URL with a token) names nothing in Redis or PostgreSQL: its
    record is named by the once's name and the key's digest."""
    url = "https://api.example.test/v1/stuff?token=s3cr3t-t0k3n"
    (process,) = fleet(1)
    assert ok(process.call(url)[0][0])["url"] == url
    names = store_names(spec)
    assert names
    assert not [n for n in names if "s3cr3t" in n or "example" in n]
    digest = shared_key_digest("ignored", url)
    assert all(digest in n for n in names), names
    assert len(digest) == 40
    assert digest.startswith(key_digest(url))


def test_every_record_in_the_store_expires(
    kind: str, spec: dict[str, Any], tmp_path: Path, fleet: Callable[..., list[Process]]
) -> None:
    """Redis: every key of the keyed records has a time to live. PostgreSQL: a leader's write
    deletes rows whose time is up, so the table holds about one ttl window of keys."""
    ttl = 4
    (process,) = fleet(1, sleep=0, fail={"bad": [1]}, once={"ttl": ttl, "cooldown": ttl})
    for batch in range(3):  # 40 at a time: each leader on PostgreSQL holds a connection
        outcomes = process.call(*[f"u{batch}-{i}" for i in range(40)])
        assert all("ok" in o[0] for o in outcomes), outcomes
    assert process.call("bad")[0][0]["error"] == "RuntimeError"
    written = time.monotonic()  # every record's time is up a ttl from here
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(spec["url"], decode_responses=True)
        try:
            names = list(client.scan_iter(match=f"{spec['namespace']}:*"))
            assert len(names) > 120
            assert all(client.pttl(n) > 0 for n in names)
        finally:
            client.close()
        return
    table = f'"{spec["table"]}_lease"'
    # 121 records, less those of the first batches that expired (and were pruned by the later
    # batches' writes) if the batches took longer than the ttl, as on a loaded machine.
    before = pg_fetch(spec, f"SELECT count(*) AS n FROM {table}")[0]["n"]
    assert 100 < before <= 121
    time.sleep(max(0.0, written + ttl + 0.2 - time.monotonic()))
    process.call("new-1")  # one write prunes up to 100 expired rows
    assert pg_fetch(spec, f"SELECT count(*) AS n FROM {table}")[0]["n"] == before + 1 - 100
    process.call("new-2")
    assert pg_fetch(spec, f"SELECT count(*) AS n FROM {table}")[0]["n"] == 2
