"""PostgresBackend's own behaviour: its table, names, connections, bounds and errors.

The store's primitives are checked by the store contract (test_postgres_store.py); the
algorithm over them by test_lease.py; processes by test_across_processes.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from backend_servers import PostgresServer, free_port, require
from timekeeping import wait_until

from fastapi_once.backends import BackendError, fencing_token
from fastapi_once.backends._base import holder_id
from fastapi_once.backends._store import Held, Lease, Reset, Served

asyncpg = require("asyncpg")
from fastapi_once.backends import PostgresBackend  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg is asyncio-only."""
    return "asyncio"


@pytest.fixture
def table() -> str:
    return "t" + secrets.token_hex(6)


@pytest.fixture
async def sql(postgres_server: PostgresServer) -> AsyncIterator[object]:
    """A connection of the test's own to the server (not counted as the backend's)."""
    conn = await asyncpg.connect(postgres_server.dsn)
    yield conn
    await conn.close()


async def answer() -> int:
    return 42


async def test_the_table_holds_the_value_under_the_keys_digest_never_the_key(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """The first use creates <table>_lease; a row holds the value's JSON text, named by the
    once's name and the key's digest; resets delete it."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    digest = "ab" * 20
    assert await backend.run_keyed("tests.pg.job", digest, answer, ttl=60) == 42
    rows = await sql.fetch(f"SELECT name, key, value FROM {table}_lease")  # type: ignore[attr-defined]
    assert [tuple(r) for r in rows] == [("tests.pg.job", digest, "42")]
    await backend.reset_keyed("tests.pg.job", None)
    assert await sql.fetchval(f"SELECT count(*) FROM {table}_lease") == 0  # type: ignore[attr-defined]
    await backend.aclose()


async def test_a_table_and_its_schema_qualified_name_are_one_namespace(
    postgres_server: PostgresServer, table: str
) -> None:
    """``table="t"`` and ``table="public.t"`` name one table: one lease per record, one
    channel for wake-ups and resets (two processes never both lead key k)."""
    plain = PostgresBackend(postgres_server.dsn, table=table)
    qualified = PostgresBackend(postgres_server.dsn, table=f"public.{table}")
    heard: list[Reset] = []
    reached = anyio.Event()
    plain.bind(lambda reset: (heard.append(reset), reached.set()))
    lease = await plain.claim("tests.pg.ns", "k", lease=5, refresh=None, holder=holder_id())
    assert isinstance(lease, Lease)
    other = await qualified.claim("tests.pg.ns", "k", lease=5, refresh=None, holder=holder_id())
    assert other == Held(holder_id())
    assert await plain.complete(lease, "1", ttl=None)
    await qualified.clear("tests.pg.ns", "k", origin="elsewhere")
    with anyio.fail_after(5):
        await reached.wait()
    assert heard == [Reset("tests.pg.ns", "k", "elsewhere")]
    await plain.aclose()
    await qualified.aclose()


@pytest.mark.parametrize("lock", ["session", "transaction"])
async def test_a_locked_table_holds_no_call_longer_than_wait_timeout(
    postgres_server: PostgresServer, table: str, sql: object, lock: str
) -> None:
    """Another connection holds the table in ACCESS EXCLUSIVE mode: a first call and a
    follower waiting on a leader each fail with BackendError within wait_timeout + 1 s."""
    leader = PostgresBackend(postgres_server.dsn, table=table, lock=lock)  # type: ignore[arg-type]
    stalled = PostgresBackend(postgres_server.dsn, table=table, lock=lock, wait_timeout=2)  # type: ignore[arg-type]
    assert await stalled.run_once("tests.pg.warm", answer) == 42  # the table exists
    working, done = anyio.Event(), anyio.Event()

    async def work() -> int:
        working.set()
        await done.wait()
        return 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(leader.run_keyed, "tests.pg.stall", "k", work, ttl=60))
        await working.wait()

        async def follow() -> None:
            with anyio.fail_after(2 + 1), pytest.raises(BackendError):
                await stalled.run_keyed("tests.pg.stall", "k", answer, ttl=60)

        tg.start_soon(follow)
        await anyio.sleep(0.5)  # the follower waits on the leader
        unlock = anyio.Event()

        async def lock_the_table() -> None:
            # Granted at once with session locks; with transaction locks it queues behind the
            # leader's open transaction, and the statements after it queue behind it.
            async with sql.transaction():  # type: ignore[attr-defined]
                await sql.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")  # type: ignore[attr-defined]
                await unlock.wait()

        tg.start_soon(lock_the_table)
        await anyio.sleep(0.2)
        with anyio.fail_after(2 + 1), pytest.raises(BackendError):
            await stalled.run_once("tests.pg.first", answer)
        await anyio.sleep(2.5)  # the follower's bound passes with the table locked
        done.set()
        unlock.set()
    await leader.aclose()
    await stalled.aclose()


async def test_connections_stay_bounded_with_40_keys_in_flight_and_after(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """Leading 40 keys at once holds one lock session per key besides the pool (pool_size)
    and the listener; afterwards at most the pool, the listener and 4 idle lock sessions."""
    backend = PostgresBackend(postgres_server.dsn, table=table, pool_size=5)
    mine = ("fastapi_once " + holder_id())[:63]

    async def count() -> int:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        return int(await sql.fetchval(query, mine))  # type: ignore[attr-defined]

    async def settles_at_most(bound: int) -> None:
        # A session whose socket was closed shows until its server process has exited.
        with anyio.fail_after(10):
            while await count() > bound:  # noqa: ASYNC110 - the server's view, polled
                await anyio.sleep(0.05)

    working, done = [anyio.Event() for _ in range(40)], anyio.Event()

    def work(i: int) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            working[i].set()
            await done.wait()
            return i

        return run

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(
                    functools.partial(
                        backend.run_keyed, "tests.pg.many", f"{i:040}", work(i), ttl=60
                    )
                )
            for event in working:
                await event.wait()
            assert 40 < await count() <= 40 + 5 + 1
            done.set()
        await settles_at_most(5 + 1 + 4)
    await backend.aclose()
    await settles_at_most(0)


async def test_a_waiting_follower_holds_one_connection_its_listeners(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """A follower's reads run on its listener's connection while it is free: a process that
    waits on another's lease holds that one connection (no pooled one)."""
    leader = PostgresBackend(postgres_server.dsn, table=table)
    follower = PostgresBackend(postgres_server.dsn, table=table, recheck_interval=60)
    mine = ("fastapi_once " + holder_id())[:63]

    async def count() -> int:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        return int(await sql.fetchval(query, mine))  # type: ignore[attr-defined]

    lease = await leader.claim("tests.pg.one", "k", lease=5, refresh=None, holder=holder_id())
    assert isinstance(lease, Lease)
    before = await count()
    async with follower.watch("tests.pg.one", "k") as watch:
        got = await follower.claim("tests.pg.one", "k", lease=5, refresh=None, holder="f")
        assert isinstance(got, Held)
        assert await count() == before + 1
        assert await leader.complete(lease, "1", ttl=None)
        with anyio.fail_after(5):
            await watch.changed(timeout=60)
        got = await follower.claim("tests.pg.one", "k", lease=5, refresh=None, holder="f")
        assert got == Served("1")
        assert await count() <= before + 1
    await leader.aclose()
    await follower.aclose()


async def test_a_claim_cancelled_mid_read_leaves_the_listeners_connection_open(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """A claim cancelled while its read runs on the listener's connection returns at once;
    the read finishes on its own and the connection is kept (the listener needs it)."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    assert await backend.run_once("tests.pg.warm", answer) == 42  # connected, listening
    query = "SELECT array_agg(pid ORDER BY pid) FROM pg_stat_activity WHERE application_name = $1"
    mine = ("fastapi_once " + holder_id())[:63]
    pids = await sql.fetchval(query, mine)  # type: ignore[attr-defined]
    async with sql.transaction():  # type: ignore[attr-defined]
        await sql.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")  # type: ignore[attr-defined]
        with anyio.fail_after(5), anyio.move_on_after(0.3) as cut:
            await backend.claim("tests.pg.cut", "k", lease=5, refresh=None, holder="c")
        assert cut.cancelled_caught
    await anyio.sleep(0.5)  # the read ends; a server process whose client went would end too
    # The read ran on after the caller went: the listener's connection (and each other) lives.
    assert set(pids) <= set(await sql.fetchval(query, mine))  # type: ignore[attr-defined]
    await backend.aclose()


async def test_statements_started_together_take_pooled_connections_beyond_the_first(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """Only the first of the statements started at once runs on the loop's own connection;
    the others take pooled ones rather than queue behind it (here, reads a locked table holds)."""
    warm = PostgresBackend(postgres_server.dsn, table=table)
    assert await warm.run_once("tests.pg.warm", answer) == 42  # the table exists
    await warm.aclose()
    backend = PostgresBackend(postgres_server.dsn, table=table)
    mine = ("fastapi_once " + holder_id())[:63]

    async def holds(n: int) -> bool:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        return int(await sql.fetchval(query, mine)) == n  # type: ignore[attr-defined]

    await wait_until(lambda: holds(0))
    unlock = anyio.Event()

    async def lock_the_table(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        locker = await asyncpg.connect(postgres_server.dsn)  # sql's counts: out of the lock
        async with locker.transaction():
            await locker.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")
            task_status.started()
            await unlock.wait()
        await locker.close()

    async with anyio.create_task_group() as tg:
        await tg.start(lock_the_table)
        for key in ("a", "b"):
            claim = functools.partial(backend.claim, lease=5, refresh=None, holder="t")
            tg.start_soon(claim, "tests.pg.together", key)
        # Both read at once (neither queues behind the other), on the own connection and one
        # pooled connection: two in all, checked once both wait on the lock.
        await wait_until(lambda: _two_waiting_on_a_lock(sql))
        assert await holds(2)
        unlock.set()
    await backend.aclose()


async def _two_waiting_on_a_lock(sql: object) -> bool:
    return len(await _waiting_on_a_lock(sql)) == 2


async def _waiting_on_a_lock(sql: object) -> list[int]:
    """The pids of this process's store connections that wait on a lock (a locked table)."""
    query = (
        "SELECT coalesce(array_agg(pid ORDER BY pid), '{}') FROM pg_stat_activity "
        "WHERE application_name = $1 AND wait_event_type = 'Lock'"
    )
    return list(await sql.fetchval(query, ("fastapi_once " + holder_id())[:63]))  # type: ignore[attr-defined]


async def test_aclose_while_a_read_runs_on_the_listeners_connection_leaves_no_connection_open(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """``aclose()`` ends the listener's connection under a read a locked table holds: the read
    fails (or ends) without connecting again, and the process holds no connection after."""
    backend = PostgresBackend(postgres_server.dsn, table=table, wait_timeout=10)
    assert await backend.run_once("tests.pg.warm", answer) == 42  # connected, listening
    mine = ("fastapi_once " + holder_id())[:63]

    async def holds(n: int) -> bool:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        return int(await sql.fetchval(query, mine)) == n  # type: ignore[attr-defined]

    locker = await asyncpg.connect(postgres_server.dsn)  # out of sql's counts
    try:
        # The transaction ends first: the table is free, and the claim ends one way or another.
        async with anyio.create_task_group() as tg, locker.transaction():
            await locker.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")

            async def claim() -> None:
                with anyio.fail_after(10), contextlib.suppress(BackendError):
                    await backend.claim("tests.pg.closed", "k", lease=5, refresh=None, holder="c")

            tg.start_soon(claim)
            await wait_until(lambda: _waiting_on_a_lock(sql))  # the read waits
            with anyio.fail_after(5):
                await backend.aclose()
            await anyio.sleep(0.3)  # a read run again would now wait on the table
        await wait_until(lambda: holds(0))
    finally:
        await locker.close()
        await backend.aclose()


async def test_a_statement_the_server_cancels_keeps_the_listeners_connection(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """A read cancelled by the server (``statement_timeout``, or ``pg_cancel_backend``) fails
    with BackendError and is not run again; the listener's connection it ran on is kept."""
    backend = PostgresBackend(postgres_server.dsn, table=table, wait_timeout=30)
    assert await backend.run_once("tests.pg.warm", answer) == 42  # connected, listening
    locker = await asyncpg.connect(postgres_server.dsn)
    try:
        async with anyio.create_task_group() as tg, locker.transaction():
            await locker.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")
            failed = anyio.Event()

            async def claim() -> None:
                with pytest.raises(BackendError):
                    await backend.claim("tests.pg.cancel", "k", lease=5, refresh=None, holder="c")
                failed.set()

            tg.start_soon(claim)
            await wait_until(lambda: _waiting_on_a_lock(sql))  # the read waits
            [pid] = await _waiting_on_a_lock(sql)
            await sql.fetchval("SELECT pg_cancel_backend($1)", pid)  # type: ignore[attr-defined]
            with anyio.fail_after(5):  # with the table still locked: not run again
                await failed.wait()
            alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"
            assert await sql.fetchval(alive, pid) == 1  # type: ignore[attr-defined]
    finally:
        await locker.close()
        await backend.aclose()


@pytest.mark.parametrize("close", [False, True], ids=["loop-end", "aclose"])
@pytest.mark.timeout(60)
def test_the_loop_ends_at_once_while_a_read_runs_on_the_listeners_connection(
    postgres_server: PostgresServer, table: str, close: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A read a locked table holds runs on after its caller was cancelled; the loop's end (with
    or without ``aclose()``) ends it at once: no task left pending, no connection left open."""
    locked, unlock = threading.Event(), threading.Event()
    mine = ("fastapi_once " + holder_id())[:63]

    async def hold_the_table() -> None:
        conn = await asyncpg.connect(postgres_server.dsn)
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")
            locked.set()
            while not unlock.is_set():  # noqa: ASYNC110 - another thread's event
                await asyncio.sleep(0.01)
        await conn.close()

    async def main() -> None:
        backend = PostgresBackend(postgres_server.dsn, table=table, wait_timeout=30)
        assert await backend.run_once("tests.pg.warm", answer) == 42  # the table exists
        holder.start()
        while not locked.is_set():  # noqa: ASYNC110 - another thread's event
            await asyncio.sleep(0.01)
        with anyio.move_on_after(0.5) as cut:  # the caller goes; the read runs on
            await backend.claim("tests.pg.end", "k", lease=5, refresh=None, holder="e")
        assert cut.cancelled_caught
        if close:
            await backend.aclose()

    async def none_left() -> None:
        # A server process waiting on the table notices its client gone once it is free.
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"

            async def gone() -> bool:
                return int(await conn.fetchval(query, mine)) == 0

            await wait_until(gone)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold_the_table(),))
    ended = threading.Event()
    loop = threading.Thread(target=lambda: (asyncio.run(main()), ended.set()))
    try:
        loop.start()
        loop.join(timeout=10)
        assert ended.is_set()  # the loop ended, without waiting for the table
    finally:
        unlock.set()
        holder.join(timeout=10)
        loop.join(timeout=10)
    asyncio.run(none_left())
    gc.collect()  # a task or connection left behind would warn now
    assert "destroyed but it is pending" not in caplog.text


async def test_a_follower_is_woken_while_its_listeners_connection_runs_a_held_up_read(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """A read held up by a locked table on the follower's listener's connection holds back the
    NOTIFYs sent meanwhile (the server hands them over between statements), but not the
    listener's check of the locks: a leader that abandons still wakes the follower."""
    leader = PostgresBackend(postgres_server.dsn, table=table)
    follower = PostgresBackend(postgres_server.dsn, table=table, recheck_interval=60)
    assert await follower.run_once("tests.pg.warm", answer) == 42  # the table exists
    lease = await leader.claim("tests.pg.late", "x", lease=5, refresh=None, holder=holder_id())
    assert isinstance(lease, Lease)
    locker = await asyncpg.connect(postgres_server.dsn)
    try:
        async with (
            anyio.create_task_group() as tg,
            locker.transaction(),  # ends first: the read then ends, and the claim
        ):
            await locker.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")

            async def claim() -> None:
                await follower.claim("tests.pg.late", "y", lease=5, refresh=None, holder="f")

            tg.start_soon(claim)  # before the watch: the listener's connection is free
            await wait_until(lambda: _waiting_on_a_lock(sql))  # the read waits
            async with follower.watch("tests.pg.late", "x") as watch:
                await leader.abandon(lease, cooldown=None)  # unlock and NOTIFY: no table
                with anyio.fail_after(follower.check_interval + 2):  # the read still waits
                    await watch.changed(timeout=60)
            assert await _waiting_on_a_lock(sql)
    finally:
        await locker.close()
        await leader.aclose()
        await follower.aclose()


async def test_a_read_after_the_server_ended_the_listeners_connection_runs_and_listening_resumes(
    postgres_server: PostgresServer, table: str, sql: object
) -> None:
    """The server ends the process's connections (the listener's among them) while its loop is
    busy, so the store has not seen them end: the next claim's read, on the listener's ended
    connection, runs again on a new one without error, and the listener listens again (a reset
    is heard)."""
    # No check of the locks (every check_interval): the listener's connection stays free.
    backend = PostgresBackend(postgres_server.dsn, table=table, check_interval=60)
    heard: list[Reset] = []
    backend.bind(heard.append)
    digest = "cd" * 20
    assert await backend.run_keyed("tests.pg.warm", digest, answer, ttl=60) == 42
    mine = ("fastapi_once " + holder_id())[:63]
    ours = "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1"

    async def listening() -> bool:  # the listener's LISTEN was its connection's last statement
        query = ours + " AND query LIKE 'LISTEN %'"
        return await sql.fetchval(query, mine) is not None  # type: ignore[attr-defined]

    await wait_until(listening)

    async def end_them() -> None:  # on a loop of its own, until the server shows them gone
        conn = await asyncpg.connect(postgres_server.dsn)
        try:
            pids = await conn.fetchval(ours, mine)
            await conn.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p", pids)
            query = "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = ANY($1::int[])"

            async def gone() -> bool:
                return bool(await conn.fetchval(query, pids))

            await wait_until(gone)
        finally:
            await conn.close()

    # Waited for without awaiting: this loop, and so the store, runs only once they have ended.
    with concurrent.futures.ThreadPoolExecutor(1) as ender:
        ender.submit(asyncio.run, end_them()).result()
    with anyio.fail_after(10):
        got = await backend.claim("tests.pg.warm", digest, lease=5, refresh=None, holder="r")
    assert got == Served("42")
    other = PostgresBackend(postgres_server.dsn, table=table)
    try:

        async def hears_a_reset() -> bool:  # sent again until the listener listens again
            await other.clear("tests.pg.warm", None, origin="elsewhere")
            await anyio.sleep(0.1)
            return Reset("tests.pg.warm", None, "elsewhere") in heard

        await wait_until(hears_a_reset)
    finally:
        await other.aclose()
        await backend.aclose()


async def test_a_claim_that_reads_before_aclose_and_locks_after_leaves_no_session_open(
    postgres_server: PostgresServer, table: str, sql: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aclose()`` ends the loop's listener between a claim's read and its lock session: the
    lease is taken on a new session, and once it ends that session is not kept idle (no
    listener runs in the loop to end it), so the process holds no connection after."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    assert await backend.run_once("tests.pg.warm", answer) == 42  # connected, listening
    mine = ("fastapi_once " + holder_id())[:63]
    fetchrow, closing = asyncpg.connection.Connection.fetchrow, [backend.aclose]

    async def read_then_close(conn: Any, *args: Any, **kwargs: Any) -> Any:
        row = await fetchrow(conn, *args, **kwargs)
        while closing:  # the claim's read only: its listener ends before it locks
            await closing.pop()()
        return row

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchrow", read_then_close)
    holder = f"raced {table}"  # the lock session's name while it holds the lease
    lease = await backend.claim("tests.pg.raced", "k", lease=5, refresh=None, holder=holder)
    assert isinstance(lease, Lease)
    assert not closing  # aclose() ran
    assert await backend.complete(lease, "done", ttl=None)

    async def holds_none() -> bool:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name IN ($1, $2)"
        names = (mine, f"fastapi_once {holder}")
        return int(await sql.fetchval(query, *names)) == 0  # type: ignore[attr-defined]

    await wait_until(holds_none)
    await backend.aclose()


async def test_a_cancelled_leader_frees_the_record_at_once(
    postgres_server: PostgresServer, table: str
) -> None:
    """A cancelled leader ends (or unlocks) its lock session: another process leads at once."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    other = PostgresBackend(postgres_server.dsn, table=table, recheck_interval=600)
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep(60)

    async with anyio.create_task_group() as tg:
        tg.start_soon(backend.run_once, "tests.pg.cancelled", forever)
        await started.wait()
        tg.cancel_scope.cancel()
    with anyio.fail_after(5):
        assert await other.run_once("tests.pg.cancelled", answer) == 42
    await backend.aclose()
    await other.aclose()


@pytest.mark.parametrize("lock", ["session", "transaction"])
async def test_a_wrong_password_or_a_closed_port_raises_backend_error_without_the_password(
    postgres_server: PostgresServer, lock: str
) -> None:
    """Driver errors are wrapped, with the DSN's password masked and the driver's as cause."""
    dsns = [
        f"postgresql://fastapi_once:wrong-secret-pw@127.0.0.1:{postgres_server.port}/postgres",
        f"postgresql://fastapi_once:wrong-secret-pw@127.0.0.1:{free_port()}/postgres",
    ]
    for dsn in dsns:
        backend = PostgresBackend(dsn, lock=lock, connect_timeout=5)  # type: ignore[arg-type]
        with pytest.raises(BackendError) as info:
            await backend.run_once("tests.pg.job", answer)
        assert "wrong-secret-pw" not in str(info.value)
        assert "fastapi_once:***@127.0.0.1" in str(info.value)
        assert info.value.__cause__ is not None
        refused = "refused the login or the database (InvalidPasswordError)"
        assert (refused in str(info.value)) is (dsn == dsns[0])  # a closed port is an outage
        await backend.aclose()


def test_a_password_in_a_keyword_dsn_is_masked_too() -> None:
    """libpq ``key=value`` strings are masked as well as URLs."""
    backend = PostgresBackend("host=db user=app password=s3cret dbname=app")
    assert "s3cret" not in backend.describe()
    assert "password=***" in backend.describe()


def test_options_are_checked() -> None:
    """A bad table name, lock mode or pool size is a ValueError that says what is allowed."""
    with pytest.raises(ValueError, match="table"):
        PostgresBackend("postgresql://h/db", table="x; DROP TABLE y")
    with pytest.raises(ValueError, match="'session' or 'transaction'"):
        PostgresBackend("postgresql://h/db", lock="advisory")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool_size"):
        PostgresBackend("postgresql://h/db", pool_size=0)
    assert "schema.t" in PostgresBackend("postgresql://h/db", table="schema.t").describe()


async def test_a_libpq_keyword_dsn_connects(postgres_server: PostgresServer, table: str) -> None:
    """``host=... port=... user=... password='...' dbname=...`` works like the URL."""
    dsn = (
        f"host=127.0.0.1 port={postgres_server.port} user=fastapi_once "
        f"password='{postgres_server.password}' dbname = postgres sslmode=disable"
    )
    backend = PostgresBackend(dsn, table=table)
    assert await backend.run_once("tests.pg.keywords", answer) == 42
    assert postgres_server.password not in backend.describe()
    assert "password=***" in backend.describe()
    await backend.aclose()


def test_a_keyword_dsn_with_an_unknown_keyword_names_it_and_what_works() -> None:
    """A typo in a keyword is a ValueError at construction, not a confusing driver error."""
    with pytest.raises(ValueError, match=r"'hots' is not supported; use dbname, .*host"):
        PostgresBackend("hots=db user=app password=s3cret")
    with pytest.raises(ValueError, match="cannot read the connection string") as info:
        PostgresBackend("host=db password='s3cret")
    assert "s3cret" not in str(info.value)


async def test_a_leader_draws_its_fencing_token_from_the_tables_sequence(
    postgres_server: PostgresServer, table: str
) -> None:
    """Each leader's token is the next value of ``<table>_fence``, so it only grows."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    tokens: list[int | None] = []

    async def work() -> None:
        tokens.append(fencing_token())

    await backend.run_once("tests.pg.fence", work)
    await backend.reset("tests.pg.fence")
    await backend.run_once("tests.pg.fence", work)
    await backend.run_once("tests.pg.other", work)
    assert tokens == [1, 2, 3]
    assert fencing_token() is None
    await backend.aclose()


@pytest.mark.parametrize("lock", ["session", "transaction"])
async def test_a_values_ttl_runs_from_when_it_is_recorded_even_after_long_work(
    postgres_server: PostgresServer, table: str, lock: str
) -> None:
    """Work that takes longer than the ttl still records a live value that another instance
    is served (with transaction locks, now() is when the lock was taken, not the record)."""
    first = PostgresBackend(postgres_server.dsn, table=table, lock=lock)  # type: ignore[arg-type]
    second = PostgresBackend(postgres_server.dsn, table=table, lock=lock)  # type: ignore[arg-type]

    async def slow() -> str:
        await anyio.sleep(1.5)
        return "made slowly"

    async def never() -> str:
        raise AssertionError("the value expired as it was written")

    with anyio.fail_after(20):
        assert await first.run_once("tests.pg.slow", slow, ttl=1.0) == "made slowly"
        assert await second.run_once("tests.pg.slow", never, ttl=1.0) == "made slowly"
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("lock", ["session", "transaction"])
async def test_a_follower_woken_by_a_completion_is_served_the_value_it_carried(
    postgres_server: PostgresServer, table: str, sql: object, lock: str
) -> None:
    """The leader's NOTIFY carries the value it recorded: the woken follower's next claim
    serves it without reading the table (here locked by another connection)."""
    leader = PostgresBackend(postgres_server.dsn, table=table, lock=lock)  # type: ignore[arg-type]
    follower = PostgresBackend(postgres_server.dsn, table=table, lock=lock)  # type: ignore[arg-type]
    lease = await leader.claim("tests.pg.news", "k", lease=5, refresh=None, holder=holder_id())
    assert isinstance(lease, Lease)
    async with follower.watch("tests.pg.news", "k") as watch:
        got = await follower.claim("tests.pg.news", "k", lease=5, refresh=None, holder="f")
        assert isinstance(got, Held)
        assert await leader.complete(lease, "1", ttl=None)
        with anyio.fail_after(5):
            await watch.changed(timeout=60)
        await anyio.sleep(1)  # the NOTIFY is heard (the first wake may be the listener's own)
        async with sql.transaction():  # type: ignore[attr-defined]
            await sql.execute(f"LOCK TABLE {table}_lease IN ACCESS EXCLUSIVE MODE")  # type: ignore[attr-defined]
            with anyio.fail_after(5):  # a read of the table would wait for the lock
                got = await follower.claim("tests.pg.news", "k", lease=5, refresh=None, holder="f")
        assert got == Served("1")
    await leader.aclose()
    await follower.aclose()


async def test_a_carried_value_is_not_served_past_its_ttl_or_after_a_reset(
    postgres_server: PostgresServer, table: str
) -> None:
    """A value heard in a NOTIFY is served only while it would be read from the table: not
    after its ttl, nor once a reset of the record was heard."""
    leader = PostgresBackend(postgres_server.dsn, table=table)
    follower = PostgresBackend(postgres_server.dsn, table=table)
    heard = anyio.Event()
    follower.bind(lambda reset: heard.set())
    for end in ("ttl", "reset"):
        name = f"tests.pg.news.{end}"
        lease = await leader.claim(name, "k", lease=5, refresh=None, holder=holder_id())
        assert isinstance(lease, Lease)
        async with follower.watch(name, "k"):
            assert isinstance(
                await follower.claim(name, "k", lease=5, refresh=None, holder="f"), Held
            )
            assert await leader.complete(lease, "1", ttl=0.5 if end == "ttl" else None)
            await anyio.sleep(1)  # the NOTIFY is heard
            if end == "ttl":
                await anyio.sleep(0.7)
            else:
                await leader.clear(name, "k", origin="elsewhere")
                with anyio.fail_after(5):
                    await heard.wait()
            got = await follower.claim(name, "k", lease=5, refresh=None, holder="f")
            assert isinstance(got, Lease), got
            await follower.abandon(got, cooldown=None)
    await leader.aclose()
    await follower.aclose()


async def test_a_notify_on_the_channel_that_is_not_a_reset_is_ignored(
    postgres_server: PostgresServer, sql: Any, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who may NOTIFY on the table's channel can send anything: a JSON message that is
    not a reset is logged and skipped, and the listener goes on hearing real resets."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    heard: list[Reset] = []
    backend.bind(heard.append)
    try:
        async with backend.watch("n", "-"):  # returns once the loop's listener listens
            pass
        for message in ("{not json", '{"name": "n", "key": 0, "origin": "o"}'):
            await sql.execute("SELECT pg_notify($1, $2)", backend._channel, message)
        await wait_until(lambda: caplog.text.count("not one of ours") == 2)
        await backend.clear("n", None, origin="elsewhere")
        await wait_until(lambda: heard == [Reset("n", None, "elsewhere")])
    finally:
        await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_postgres_backend_refuses_trio_clearly(postgres_server: PostgresServer) -> None:
    """asyncpg needs asyncio: on trio the error says so, naming the backend."""
    backend = PostgresBackend(postgres_server.dsn)
    with pytest.raises(RuntimeError, match=r"PostgresBackend\(.*\) runs on asyncio only"):
        await backend.run_once("tests.pg.trio", answer)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_postgres_backend_refuses_a_reset_on_trio_clearly(
    postgres_server: PostgresServer,
) -> None:
    """A reset on trio fails as a call does: the error names the backend and asyncio."""
    backend = PostgresBackend(postgres_server.dsn)
    with pytest.raises(RuntimeError, match=r"PostgresBackend\(.*\) runs on asyncio only"):
        await backend.reset_keyed("tests.pg.trio", None)
