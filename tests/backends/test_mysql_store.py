"""MySQLBackend (on a real MariaDB server the suite starts): the store contract, and what is
MySQL's own: the URL, the login, the lock session, the tables, the connections."""

from __future__ import annotations

import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from backend_servers import MariaDBServer, free_port, require
from store_contract import StoreContract, StoreKit
from timekeeping import wait_until

asyncmy = require("asyncmy")

from fastapi_once.backends import BackendError, MySQLBackend  # noqa: E402
from fastapi_once.backends import _mysql as mysql_store  # noqa: E402
from fastapi_once.backends._store import (  # noqa: E402
    UNKEYED,
    Cooling,
    Lease,
    Reset,
    StoreUnavailableError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncmy is asyncio-only."""
    return "asyncio"


@pytest.fixture
def table() -> str:
    return "t" + secrets.token_hex(6)


class TestMySQLStore(StoreContract):
    @pytest.fixture
    async def kit(self, mariadb_server: MariaDBServer) -> AsyncIterator[StoreKit]:
        make = lambda: MySQLBackend(mariadb_server.url, table="contract")  # noqa: E731
        async with StoreKit.closing(make) as kit:
            yield kit


async def query(server: MariaDBServer, sql: str, *args: Any) -> list[Any]:
    """Run one statement on a connection of the test's own."""
    conn = await asyncmy.connect(**connect_args(server), autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql, args)
            return list(await cur.fetchall())
    finally:
        conn.close()


def connect_args(server: MariaDBServer) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "user": "fastapi_once",
        "password": server.password,
        "db": "fastapi_once_tests",
    }


async def work() -> dict[str, int]:
    return {"schema": 3}


async def test_a_wrong_password_fails_at_once_naming_the_fix_without_the_password(
    mariadb_server: MariaDBServer,
) -> None:
    """The server refuses the login: a BackendError (not an outage to ride out) that names
    what to check; neither the message, the describe() nor the repr holds the password."""
    url = mariadb_server.url.replace(mariadb_server.password, "hunter2-wrong")
    backend = MySQLBackend(url, wait_timeout=30)
    with anyio.fail_after(10), pytest.raises(BackendError) as info:
        await backend.run_once("tests.mysql.login", work)
    assert not isinstance(info.value, StoreUnavailableError)
    assert "refused the login" in str(info.value)
    assert "check the user, password and database" in str(info.value)
    for text in (str(info.value), backend.describe(), repr(backend)):
        assert "hunter2" not in text
        assert "fastapi_once:***@127.0.0.1" in text
    await backend.aclose()


async def test_a_closed_port_is_an_outage_named_without_the_password(
    mariadb_server: MariaDBServer,
) -> None:
    """Nothing listens: the store cannot be reached, said at once (the once never reached it)."""
    url = f"mysql://fastapi_once:hunter2@127.0.0.1:{free_port()}/fastapi_once_tests"
    backend = MySQLBackend(url, wait_timeout=30)
    with anyio.fail_after(10), pytest.raises(StoreUnavailableError) as info:
        await backend.run_once("tests.mysql.closed", work)
    assert "cannot be reached" in str(info.value)
    assert "hunter2" not in str(info.value)
    await backend.aclose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"table": "db.t"}, "without a database"),
        ({"table": "x" * 52}, "at most 51"),
        ({"max_connections": 0}, "at least 1"),
        ({"poll_interval": 0}, "poll_interval=0"),
        ({"wait_timeout": -1}, "wait_timeout=-1"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MySQLBackend("mysql://u:hunter2@db/app", **options)


async def test_the_tables_are_innodb_and_a_lease_lock_names_no_key(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """The records, fences and events are InnoDB tables made on first use; a leader's
    GET_LOCK is named after its fence (within MySQL's 64 characters), not its key."""
    backend = MySQLBackend(mariadb_server.url, table=table)
    key = "k" * 40
    lease = await backend.claim("tests.mysql.secret-name", key, lease=5, refresh=None, holder="h")
    assert isinstance(lease, Lease)
    lock = lease.handle[0]
    assert len(lock) <= 64
    assert "secret" not in lock
    assert "kkkk" not in lock
    assert str(lease.fence) in lock
    assert (await query(mariadb_server, "SELECT IS_USED_LOCK(%s) IS NOT NULL", lock)) == [(1,)]
    engines = await query(
        mariadb_server,
        "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
        "'fastapi_once_tests' AND TABLE_NAME LIKE %s ORDER BY TABLE_NAME",
        table + "%",
    )
    assert engines == [
        (table, "InnoDB"),
        (f"{table}_events", "InnoDB"),
        (f"{table}_fence", "InnoDB"),
    ]
    assert await backend.complete(lease, "1", ttl=None)
    assert (await query(mariadb_server, "SELECT IS_USED_LOCK(%s)", lock)) == [(None,)]
    await backend.aclose()


async def test_only_the_first_connection_of_a_backend_makes_the_tables(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """The tables are made (if missing) by a backend's first connection, not by every one: a
    CREATE TABLE that finds its table is still written to the binary log (and, on Galera, run
    on every node)."""
    backend = MySQLBackend(mariadb_server.url, table=table)
    first, second = await backend._connect(), await backend._connect()
    try:
        made = []
        for conn in (first, second):
            async with conn.cursor() as cursor:
                await cursor.execute("SHOW SESSION STATUS LIKE 'Com_create_table'")
                made.append(int((await cursor.fetchone())[1]))
        assert made == [3, 0]
    finally:
        first.close()
        second.close()
        await backend.aclose()


async def test_a_locked_table_makes_no_call_wait_longer_than_wait_timeout(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """Another session holds the records table locked: the call fails after wait_timeout
    (2 s) rather than waiting for the lock, and the store answers again once it is free."""
    backend = MySQLBackend(mariadb_server.url, table=table, wait_timeout=2)
    await backend.run_once("tests.mysql.warm", work)  # the tables and connections exist
    locker = await asyncmy.connect(**connect_args(mariadb_server), autocommit=True)
    try:
        async with locker.cursor() as cur:
            await cur.execute(f"LOCK TABLES `{table}` WRITE")
        # The server's own lock wait (set to wait_timeout) or the client's bound ends it.
        with anyio.fail_after(2 + 1), pytest.raises(StoreUnavailableError):
            await backend.run_once("tests.mysql.stalled", work)
    finally:
        locker.close()
    assert await backend.run_once("tests.mysql.stalled", work) == {"schema": 3}
    await backend.aclose()


async def test_a_server_that_never_answers_makes_no_call_wait_longer_than_wait_timeout() -> None:
    """A port that accepts connections and never speaks: the call ends after wait_timeout."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"mysql://u:hunter2@127.0.0.1:{mute.getsockname()[1]}/app"
        backend = MySQLBackend(url, wait_timeout=1)
        with anyio.fail_after(1 + 1), pytest.raises(StoreUnavailableError):
            await backend.run_once("tests.mysql.mute", work)
        await backend.aclose()


async def test_40_keys_in_flight_hold_at_most_max_connections_and_the_lock_session(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """One process leads 40 keys at once: the server sees at most max_connections (10) of its
    statement connections plus its one lock session, during and after; aclose ends them."""
    counter = await asyncmy.connect(**connect_args(mariadb_server), autocommit=True)
    counting = anyio.Lock()

    async def clients() -> int:
        """The server's sessions of the test's user, but the counting one."""
        async with counting, counter.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'fastapi_once'"
            )
            return int((await cur.fetchone())[0]) - 1

    before = await clients()  # other tests' stores still closing, if any
    backend = MySQLBackend(mariadb_server.url, table=table)
    seen: list[int] = []

    async def fetch() -> str:
        seen.append(await clients() - before)
        await anyio.sleep(0.3)
        return "v"

    async def lead(key: str) -> None:
        assert await backend.run_keyed("tests.mysql.many", key, fetch, ttl=60) == "v"

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(lead, secrets.token_hex(20))
        assert len(seen) == 40
        assert max(seen) <= 10 + 1
        assert await clients() - before <= 10 + 1
        await backend.aclose()
        for _ in range(100):  # the server ends the closed sessions soon
            if await clients() - before <= 0:
                break
            await anyio.sleep(0.02)
        assert await clients() - before <= 0
    finally:
        counter.close()


async def test_records_with_nothing_left_to_serve_are_pruned_and_the_others_kept(
    mariadb_server: MariaDBServer, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener deletes, in batches (7 rows here), the rows of records with nothing left:
    20 keys whose ttl passed, and a reset key; events older than their keep (0.5 s here); and
    every fence but the newest (26 drawn).
    A value with no ttl or an unexpired one, a failure cooling down, and a live lease on a
    record whose value expired stay."""
    monkeypatch.setattr(mysql_store, "_KEEP_EVENTS", 0.5)
    monkeypatch.setattr(mysql_store, "_BATCH", 7)
    backend = MySQLBackend(mariadb_server.url, table=table)
    name = "tests.mysql.prune"

    async def lead(key: str) -> Lease:
        lease = await backend.claim(name, key, lease=60, refresh=None, holder="h")
        assert isinstance(lease, Lease)
        return lease

    for i in range(20):
        assert await backend.complete(await lead(f"expired{i:02}"), "1", ttl=0.2)
    assert await backend.complete(await lead("reset"), "1", ttl=None)
    await backend.clear(name, "reset", origin="o")
    assert await backend.complete(await lead("forever"), "1", ttl=None)
    assert await backend.complete(await lead("unexpired"), "1", ttl=60)
    await backend.abandon(await lead("cooling"), cooldown=60)
    assert await backend.complete(await lead("refreshing"), "1", ttl=0.2)
    await anyio.sleep(0.2)
    refreshing = await lead("refreshing")  # the value expired: the next leader holds it
    kept = {"forever", "unexpired", "cooling", "refreshing"}

    async def left() -> tuple[set[str], int, list[Any]]:
        rows = await query(mariadb_server, f"SELECT rkey FROM `{table}`")
        events = await query(mariadb_server, f"SELECT COUNT(*) FROM `{table}_events`")
        fences = await query(mariadb_server, f"SELECT id FROM `{table}_fence`")
        return {key for (key,) in rows}, int(events[0][0]), fences

    assert len((await left())[0]) == 20 + 1 + len(kept)
    monkeypatch.setattr(mysql_store, "_PRUNE_EVERY", 0.2)  # from 30 s
    for _ in range(300):  # a hang guard (30 s): the listener prunes every 0.2 s here
        if await left() == (kept, 0, [(refreshing.fence,)]):
            break
        await anyio.sleep(0.1)
    assert await left() == (kept, 0, [(refreshing.fence,)])
    assert refreshing.fence == 26
    assert await backend.claim(name, "cooling", lease=1, refresh=None, holder="h") == Cooling(
        pytest.approx(60, abs=30)
    )
    assert await backend.complete(refreshing, "2", ttl=60)
    await backend.aclose()


async def test_a_reset_is_heard_once_though_the_next_polls_read_it_again(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """Each poll reads the events after the newest id a poll saw a second before (one may
    commit up to 1 s after a newer one): a reset from another process is heard once, not at
    every poll that reads it."""
    listening, other = (
        MySQLBackend(mariadb_server.url, table=table),
        MySQLBackend(mariadb_server.url, table=table),
    )
    heard: list[Reset] = []
    listening.bind(heard.append)
    async with listening.watch("tests.mysql.heard-once", UNKEYED):  # its listener listens
        await other.clear("tests.mysql.heard-once", None, origin="other")
        await anyio.sleep(1.5)  # about 60 polls (every 25 ms): the reset's second has passed
    assert heard == [Reset("tests.mysql.heard-once", None, "other")]
    await listening.aclose()
    await other.aclose()


async def test_a_reset_written_while_the_servers_clock_is_set_back_is_heard_once(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """The server's clock steps back an hour (NTP, a failover to a server whose clock is
    behind) after the listener has polled: a reset written then, with that time, is heard all
    the same (the listener reads events by id, not by the server's time), and once."""
    listening = MySQLBackend(mariadb_server.url, table=table)
    heard: list[Reset] = []
    first = anyio.Event()

    def hear(reset: Reset) -> None:
        heard.append(reset)
        first.set()

    listening.bind(hear)
    name = "tests.mysql.clock-back"
    async with listening.watch(name, UNKEYED):  # its listener has polled: the tables exist
        # The store's own event, written by a session whose clock is an hour behind.
        await query(
            mariadb_server,
            "SET TIMESTAMP = UNIX_TIMESTAMP(NOW(6)) - 3600; INSERT INTO "
            f"`{table}_events` (at, name, rkey, origin) VALUES (NOW(6), %s, NULL, 'other')",
            name,
        )
        behind = await query(
            mariadb_server, f"SELECT TIMESTAMPDIFF(SECOND, at, NOW(6)) FROM `{table}_events`"
        )
        assert behind[0][0] >= 3599  # the server took the session's time as NOW(6)
        with anyio.fail_after(5):  # a hang guard: it is heard within about 25 ms
            await first.wait()
        await anyio.sleep(1.5)  # about 60 polls more: it is not heard again
    assert heard == [Reset(name, None, "other")]
    await listening.aclose()


async def _three_heard_then_passed(listening: MySQLBackend, name: str, heard: list[Reset]) -> None:
    """Three resets of ``name`` written and ``heard``, then 2.2 s: from then on the listener
    reads only the ids above them (it reads above those a poll saw 1 s to 2 s before)."""
    for _ in range(3):
        await listening.clear(name, None, origin="before")
    await wait_until(lambda: len(heard) == 3)
    await anyio.sleep(2.2)


async def test_resets_are_heard_after_the_events_ids_start_again(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """The events log emptied (pruned after a quiet minute) and its ids started again from 1
    (as MySQL 5.7 does for an empty table when it restarts): the listener reads the new ids,
    not only those above the newest it had seen."""
    listening = MySQLBackend(mariadb_server.url, table=table)
    heard: list[Reset] = []
    listening.bind(heard.append)
    name = "tests.mysql.ids-again"
    async with listening.watch(name, UNKEYED):  # its listener polls every 25 ms
        await _three_heard_then_passed(listening, name, heard)
        await query(mariadb_server, f"DELETE FROM `{table}_events`")
        await anyio.sleep(0.3)  # the listener's polls find the log empty
        await query(mariadb_server, f"ALTER TABLE `{table}_events` AUTO_INCREMENT = 1")
        await listening.clear(name, None, origin="after")
        ids = await query(mariadb_server, f"SELECT id FROM `{table}_events`")
        assert ids == [(1,)]  # the ids started again
        await wait_until(lambda: len(heard) == 4)  # within about 25 ms
    assert heard == [Reset(name, None, "before")] * 3 + [Reset(name, None, "after")]
    await listening.aclose()


async def test_a_reset_written_before_the_listener_finds_the_ids_started_again_is_heard(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """The events log emptied and its ids started again from 1, the store's connections lost
    (a restart), and a reset written there before the listener's next poll (it was
    reconnecting): the poll that finds the newest id below those it read takes every event in
    the log as new, not only those above the newest it finds."""
    listening = MySQLBackend(mariadb_server.url, table=table)
    heard: list[Reset] = []
    listening.bind(heard.append)
    name = "tests.mysql.ids-again-unseen"
    async with listening.watch(name, UNKEYED):  # its listener polls every 25 ms
        await _three_heard_then_passed(listening, name, heard)
        # The log locked throughout (no poll finds it empty): emptied, its ids started again,
        # a reset written, and every other connection ended, as a restart ends them.
        conn = await asyncmy.connect(**connect_args(mariadb_server), autocommit=True)
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"LOCK TABLES `{table}_events` WRITE")
                await cur.execute(f"DELETE FROM `{table}_events`")
                await cur.execute(f"ALTER TABLE `{table}_events` AUTO_INCREMENT = 1")
                await cur.execute(
                    f"INSERT INTO `{table}_events` (at, name, rkey, origin) "
                    "VALUES (NOW(6), %s, NULL, 'after')",
                    (name,),
                )
                await cur.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s "
                    "AND ID <> CONNECTION_ID()",
                    (connect_args(mariadb_server)["user"],),
                )
                for (other,) in await cur.fetchall():
                    with contextlib.suppress(asyncmy.errors.Error):  # it ended meanwhile
                        await cur.execute(f"KILL CONNECTION {int(other)}")
                await cur.execute("UNLOCK TABLES")
        finally:
            conn.close()
        ids = await query(mariadb_server, f"SELECT id FROM `{table}_events`")
        assert ids == [(1,)]  # the ids started again
        await wait_until(lambda: len(heard) == 4)  # once the listener reconnects
    assert heard == [Reset(name, None, "before")] * 3 + [Reset(name, None, "after")]
    await listening.aclose()


async def test_events_below_the_newest_are_not_heard_again_when_the_newest_are_pruned(
    mariadb_server: MariaDBServer, table: str
) -> None:
    """After the server's clock is set back, the events written since are dated before the
    older ones, and pruning deletes them first: the poll that finds the log's newest id below
    those it read (its connection kept: no restart) reads on above it, and hears none of the
    older events again."""
    listening = MySQLBackend(mariadb_server.url, table=table)
    heard: list[Reset] = []
    listening.bind(heard.append)
    name = "tests.mysql.newest-pruned"
    async with listening.watch(name, UNKEYED):  # its listener polls every 25 ms
        for origin in ("older", "older", "newest"):
            await listening.clear(name, None, origin=origin)
        await wait_until(lambda: len(heard) == 3)
        await anyio.sleep(2.2)  # the listener now reads only the ids above them (1 s to 2 s)
        (newest,) = await query(mariadb_server, f"SELECT MAX(id) FROM `{table}_events`")
        await query(mariadb_server, f"DELETE FROM `{table}_events` WHERE id = %s", newest[0])
        await anyio.sleep(0.5)  # about 20 polls
        await listening.clear(name, None, origin="after")
        await wait_until(lambda: len(heard) == 4)
        await anyio.sleep(0.5)  # about 20 polls more
    expected = ["older", "older", "newest", "after"]
    assert heard == [Reset(name, None, origin) for origin in expected]
    await listening.aclose()


async def test_a_claim_cut_off_after_it_took_the_lock_lets_go_of_it(
    mariadb_server: MariaDBServer, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim whose last round trip (the row's lease and COMMIT) fails after GET_LOCK took
    the lease's lock releases that lock: it is not left held on the loop's lock session until
    the session ends; the next claim leads."""
    store = MySQLBackend(mariadb_server.url, table=table)
    real = MySQLBackend._run
    fences: list[int] = []  # the lease's, which names its lock (its row is rolled back)

    async def cut(self: MySQLBackend, conn: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql.startswith(f"UPDATE `{table}` SET fence"):
            fences.append(args[0][0])
            raise StoreUnavailableError("cut off")
        return await real(self, conn, sql, *args, **kwargs)

    try:
        with monkeypatch.context() as patched:
            patched.setattr(MySQLBackend, "_run", cut)
            with pytest.raises(StoreUnavailableError):
                await store.claim("n", UNKEYED, lease=30, refresh=None, holder="test")
        lock = f"{store._lock_prefix}{fences[0]}"
        assert await query(mariadb_server, "SELECT IS_USED_LOCK(%s)", lock) == [(None,)]
        lease = await store.claim("n", UNKEYED, lease=30, refresh=None, holder="test")
        assert isinstance(lease, Lease)
        await store.abandon(lease, cooldown=None)
    finally:
        await store.aclose()
