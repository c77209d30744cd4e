"""PostgresBackend: the lease algorithm over PostgreSQL (asyncpg); connections in ``_pgconn``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal

import anyio

from .._errors import BackendError
from ._base import PerLoop, Scrubber, backoff, whole
from ._base import seconds as _seconds
from ._lease import StoreBackend, StoreOptions
from ._pgconn import APPLICATION, DRIVER_ERRORS, Connections, connect_args
from ._store import Claim, Cooling, Held, Lease, Reset, Served, StoreUnavailableError, Watch
from ._wakeups import Listeners, ListenerWatch, Wakeups

if TYPE_CHECKING:
    from typing_extensions import Unpack

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,56}")  # room for "_lease" and "_fence"
_UNTIL = "clock_timestamp() + make_interval(secs => {}::float8)"  # NULL seconds: never
_HELD = (  # an advisory lock key k (bigint) as pg_locks shows it, granted
    "l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid = "
    "(({k} >> 32) & 4294967295)::oid AND l.objid = ({k} & 4294967295)::oid"
)
# The statements; {t} is the records table. clock_timestamp(), not now(): with
# lock="transaction" the leader's transaction began before its work ran.
_READ = (  # one row, record or not: value unless expired, due for refresh, cooldown, holder
    # (looked up only when the value is not fresh; $4: the lock, NULL for none)
    "SELECT r.value, r.stale, r.cool_left, CASE WHEN r.value IS NULL OR r.stale THEN ("
    "SELECT coalesce(nullif(a.application_name, ''), 'PostgreSQL backend pid ' || l.pid) "
    "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.mode = "
    f"'ExclusiveLock' AND {_HELD.format(k='$4::bigint')} LIMIT 1) END AS holder "
    "FROM (SELECT 1) AS one LEFT JOIN ("
    "SELECT CASE WHEN value_until IS NULL OR value_until > clock_timestamp() THEN value END "
    "AS value, coalesce(made_at <= clock_timestamp() - make_interval(secs => $3::float8), "
    "false) AS stale, extract(epoch FROM cool_until - clock_timestamp())::float8 AS cool_left "
    "FROM {t} WHERE name = $1 AND key = $2) AS r ON true"
)
_WRITE = (  # prune up to 100 expired rows of other records, write this one, NOTIFY at commit
    "WITH pruned AS (DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} "
    "WHERE expires_at < now() AND NOT (name = $1 AND key = $2) LIMIT 100 "
    "FOR UPDATE SKIP LOCKED))), written AS (INSERT INTO {t} AS r (name, key, value, made_at, "
    "value_until, expires_at) VALUES ($1, $2, $3, clock_timestamp(), {u4}, {u4}) "
    "ON CONFLICT (name, key) DO UPDATE SET value = EXCLUDED.value, made_at = EXCLUDED.made_at, "
    "value_until = EXCLUDED.value_until, cool_until = NULL, expires_at = EXCLUDED.expires_at "
    "RETURNING 1) SELECT pg_notify($5, $6) FROM written"
)
_COOL = (  # a cooldown, keeping the value; the row expires with the later of the two
    "INSERT INTO {t} AS r (name, key, cool_until, expires_at) VALUES ($1, $2, {u3}, {u3}) "
    "ON CONFLICT (name, key) DO UPDATE SET cool_until = EXCLUDED.cool_until, expires_at = "
    "CASE WHEN r.value IS NOT NULL AND r.value_until IS NULL THEN NULL "
    "ELSE greatest(r.expires_at, EXCLUDED.expires_at) END"
)
_DELETE = (
    "WITH gone AS (DELETE FROM {t} WHERE name = $1 AND ($2::text IS NULL OR key = $2)) "
    "SELECT pg_notify($3, $4)"
)
_FREE = (  # which of the advisory locks $1 no session holds
    "SELECT coalesce(array_agg(k), '{}') FROM unnest($1::bigint[]) AS k WHERE NOT EXISTS ("
    f"SELECT 1 FROM pg_locks l WHERE {_HELD.format(k='k')})"
)
_TRY = (  # the fencing token if the lock was free; the holder's name for followers either way
    "SELECT CASE WHEN pg_try_advisory{x}_lock($1) THEN nextval('{s}') END, "
    "set_config('application_name', $2, false)"
)
_RESOLVE = (  # the records table's schema-qualified name, if it and the sequence exist
    "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n "
    "ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1) AND to_regclass($2) IS NOT NULL"
)
#: How often a listener checks the locks its loop's watches follow: a dead leader's lock ends
#: with its session, which no NOTIFY announces.
ORPHANS_EVERY = 0.1


class PostgresBackend(StoreBackend):
    """Share a once's value across every process (and host) that uses one PostgreSQL database.

    The lease algorithm over PostgreSQL's own primitives: a row per record in
    ``<table>_lease``, an advisory lock per record held by the leader's own connection (a dead
    leader's lock ends with its session), ``NOTIFY`` to wake followers and announce resets,
    and the ``<table>_fence`` sequence for fencing tokens; both made on first use. Per process
    and event loop: the listener's connection (which runs the statements while free), at most
    ``pool_size`` pooled ones, a lock session per record led and up to 4 idle ones (see
    ``docs/across.md``). Every statement is bounded by ``wait_timeout``. asyncio only.

    Args:
        dsn: a ``postgresql://`` (or ``postgres://``) URL or a libpq ``key=value`` string; its
            password never appears in errors, logs or :meth:`describe`.
        table: the tables' base name, optionally schema-qualified (``schema.table``); ``t`` and
            ``public.t`` (one table) share records, locks and notifications.
        lock: ``"session"``, or ``"transaction"`` for PgBouncer's transaction pooling (the
            listener needs a session all the same: its NOTIFYs come late without one).
        wait_timeout: the longest a follower waits, and any one statement takes, in seconds
            (default 300); None: no bound.
        ttl: the default life of an unkeyed once's value in seconds; None: until reset.
        connect_timeout: seconds allowed to connect.
        check_interval: how often a leader checks that its lock session lives, and the
            listener its connection, in seconds (default 1).
        poll_interval: accepted and unused (followers are woken by NOTIFY).
        max_value_bytes: the largest value recorded, in bytes of JSON (default 1 MiB).
        recheck_interval: how often a waiting follower claims again without being woken.
        pool_size: the most pooled connections per event loop (default 8), for statements
            that overlap one on the loop's own connection.

    Raises:
        ValueError: ``table`` is not an identifier, ``lock`` is unknown, a time is not a
            positive number, or a ``key=value`` DSN has a keyword this backend does not know.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "fastapi_once",
        lock: Literal["session", "transaction"] = "session",
        connect_timeout: float = 10.0,
        check_interval: float = 1.0,
        poll_interval: float = 0.025,
        pool_size: int = 8,
        **options: Unpack[StoreOptions],
    ) -> None:
        parts = table.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            raise ValueError(
                f"PostgresBackend(table={table!r}): give a table name, optionally "
                "schema-qualified, of at most 57 letters, digits and underscores (e.g. "
                "'fastapi_once')"
            )
        if lock not in ("session", "transaction"):
            raise ValueError(
                f"PostgresBackend(lock={lock!r}): lock is 'session' or 'transaction' (for "
                "PgBouncer transaction pooling)"
            )
        check_interval = _seconds("check_interval", check_interval)
        # The lease is renewed (its session checked) every check_interval.
        super().__init__(lease=3 * check_interval, **options)
        self.table, self.lock = table, lock
        self.pool_size = whole("PostgresBackend", "pool_size", pool_size, least=1)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        self.check_interval, self.poll_interval = check_interval, poll_interval
        _seconds("poll_interval", poll_interval)
        schema = [f'"{p}"' for p in parts[:-1]]
        self._fences = ".".join([*schema, f'"{parts[-1]}_fence"'])
        self._records = t = ".".join([*schema, f'"{parts[-1]}_lease"'])
        self._sql = {
            "read": _READ.format(t=t),
            "write": _WRITE.format(t=t, u4=_UNTIL.format("$4")),
            "cool": _COOL.format(t=t, u3=_UNTIL.format("$3")),
            "delete": _DELETE.format(t=t),
            "try": _TRY.format(x="" if lock == "session" else "_xact", s=self._fences),
        }
        # The records table's full name as the server resolves it (so "t" and "public.t" are
        # one namespace of locks and one channel); set once the server was first reached.
        self._namespace: str | None = None
        self._channel = ""
        self._shown = Scrubber(dsn).shown
        refusal = f"{self.describe()} runs on asyncio only (asyncpg); run the app on asyncio"
        args = connect_args(dsn, self._shown)
        args["timeout"], args["command_timeout"] = self.connect_timeout, self.wait_timeout
        # Transaction pooling cannot keep prepared statements between transactions.
        args["statement_cache_size"] = 0 if lock == "transaction" else 100
        self._connections = Connections(args, pool_size, self._setup, self.describe, refusal)
        # Per event loop, touched only by its own thread: the (lock, record id) its watches
        # follow, counted (its listener wakes a record's watches when the lock is free), and the
        # values heard for them (record id -> value, when heard, ttl), dropped with the
        # record's last watch and at any reset.
        self._followed = PerLoop(collections.Counter[tuple[int, str]], refusal)
        self._news = PerLoop(dict[str, tuple[str, float, float]], refusal)
        self._listeners = Listeners(self._listen)

    def describe(self) -> str:
        """Return ``PostgresBackend(<dsn with the password masked>, table=..., lock=...)``."""
        return f"PostgresBackend({self._shown}, table={self.table}, lock={self.lock})"

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """See ``LeaseStore.claim``: a value heard, else a read (see ``Connections.run``);
        with nothing to serve and the lock free, try it on a lock session and read again there."""
        news = self._news.get().get(_record(name, key))
        if news is not None:  # heard as the leader recorded it: as fresh as a read
            value, heard, ttl = news
            age = anyio.current_time() - heard
            if age < ttl and (refresh is None or age < refresh):
                return Served(value)
        self._listeners.start()  # its end ends the loop's connections: see _listen

        async def read(conn: Any) -> tuple[int, Any]:  # connecting has resolved the namespace
            lock = self._lock_key(name, key)
            return lock, await conn.fetchrow(self._sql["read"], name, key, refresh, lock)

        lock, row = await self._connections.run("reading the record", read)
        found = _decide(row)
        if found is not None:
            return found
        conn = await self._connections.session()
        try:
            with self._connections.errors("taking the lease"):
                if self.lock == "transaction":
                    await conn.execute("BEGIN")
                fence = await conn.fetchval(self._sql["try"], lock, APPLICATION + holder)
                if fence is not None:  # a statement after the lock sees the last one's commit
                    row = await conn.fetchrow(self._sql["read"], name, key, refresh, None)
                    found = _decide(row)
                    if found is None:
                        return Lease(name, key, int(fence), (conn, lock))
                if fence is not None or self.lock == "transaction":
                    await self._unlock(conn, lock)
        except BaseException:
            self._connections.release(conn, keep=False)  # ends the session, and a lock it took
            raise
        self._release(conn, True)
        return found or Held(None)  # Held: another process took the lock since the read

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """Check that the lease's lock session lives (its lock cannot end otherwise)."""
        # Shielded, bounded by its timeout: a check cut off half-way would leave the session
        # busy for the complete or abandon that follows.
        conn, _ = lease.handle  # its lock session, the lock's key
        with anyio.CancelScope(shield=True), self._lost(conn):
            await conn.fetchval("SELECT 1", timeout=min(seconds, self.wait_timeout or seconds))
            return True
        return False

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """See ``LeaseStore.complete``: on the lock session, write and NOTIFY, then unlock
        (session locks: after the write's commit, or another could lead on the old row)."""
        (conn, lock), clean, record = lease.handle, False, _record(lease.name, lease.key)
        news = f"{record} {'-' if ttl is None else repr(ttl)} {value}"  # the ttl, the value
        news = news if len(news.encode()) <= 7900 else record  # NOTIFY's limit: 8000 bytes
        try:
            with self._lost(conn):
                args = (lease.name, lease.key, value, ttl, self._channel, news)
                await conn.execute(self._sql["write"], *args)
                await self._unlock(conn, lock)
                clean = True
            return clean
        finally:
            self._release(conn, clean)

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """See ``LeaseStore.abandon``: record the cooldown, unlock and NOTIFY."""
        (conn, lock), clean = lease.handle, False
        try:
            with contextlib.suppress(*DRIVER_ERRORS):
                if cooldown is not None:
                    await conn.execute(self._sql["cool"], lease.name, lease.key, cooldown)
                wake = (self._channel, _record(lease.name, lease.key))
                await self._unlock(conn, lock, wake)
                clean = True
        finally:
            self._release(conn, clean)

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """Delete the record(s) and NOTIFY the reset, in one statement."""
        message = Reset(name, key, origin).to_json()
        self._news.get().clear()  # get(): on trio, the refusal that names the backend
        self._listeners.start()
        await self._connections.run(
            "clearing the record",
            lambda c: c.execute(self._sql["delete"], name, key, self._channel, message),
        )

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[Watch]:
        """Register with this loop's listener for the record's NOTIFYs (see ``_listen``)."""
        followed = self._followed.get()
        entry = (self._lock_key(name, key), _record(name, key))
        followed[entry] += 1
        try:
            with ListenerWatch(self._listeners, entry[1]) as watch:
                await watch.wakeups.until_listening(self.recheck_interval)
                yield watch
        finally:
            followed[entry] -= 1
            if followed[entry] <= 0:
                del followed[entry]
                self._news.get().pop(entry[1], None)

    async def aclose(self) -> None:
        """Stop the running loop's listener; its end ends the loop's connections."""
        await self._listeners.stop()

    def _release(self, conn: Any, clean: bool) -> None:
        # Idle sessions are kept only while the loop's listener runs, whose end ends them: one
        # lent after aclose() ended it (to a claim that had read before) would outlive the loop.
        keep = clean and asyncio.get_running_loop() in self._listeners
        self._connections.release(conn, keep=keep)

    @contextlib.contextmanager
    def _lost(self, conn: Any) -> Iterator[None]:
        """Driver errors as ``Connections.errors``, but none once ``conn`` has ended (its lock
        with it): the caller's lease is then lost."""
        try:
            with self._connections.errors("using the lock session"):
                yield
        except StoreUnavailableError:
            if not conn.is_closed():
                raise

    async def _unlock(self, conn: Any, lock: int, wake: tuple[str, str] | None = None) -> None:
        """Free ``lock`` (NOTIFY ``wake``: channel, payload). A NOTIFY is delivered at its
        statement's commit, after the unlock in it, or by the COMMIT that unlocks: followers
        woken find the lock free."""
        if self.lock == "transaction":
            if wake:
                await conn.execute("SELECT pg_notify($1, $2)", *wake)
            await conn.execute("COMMIT")  # releases the lock; publishes the writes and NOTIFY
        elif wake:
            await conn.execute("SELECT pg_advisory_unlock($1), pg_notify($2, $3)", lock, *wake)
        else:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock)

    async def _setup(self, conn: Any) -> None:
        """Create the table and sequence unless they exist; resolve the table's full name."""
        if self._namespace is not None:
            return
        namespace = await conn.fetchval(_RESOLVE, self._records, self._fences)
        if namespace is None:
            # One multi-statement query is one transaction: its lock keeps concurrent first
            # uses from racing on CREATE.
            await conn.execute(
                f"SELECT pg_advisory_xact_lock({_lock_key('setup')}); "
                f"CREATE TABLE IF NOT EXISTS {self._records} (name text NOT NULL, "
                "key text NOT NULL, value text, made_at timestamptz, value_until timestamptz, "
                "cool_until timestamptz, expires_at timestamptz, PRIMARY KEY (name, key)); "
                f"CREATE SEQUENCE IF NOT EXISTS {self._fences}"
            )
            namespace = await conn.fetchval(_RESOLVE, self._records, self._fences)
        self._channel = "fastapi_once_" + hashlib.sha256(namespace.encode()).hexdigest()[:24]
        self._namespace = str(namespace)

    async def _listen(self, wakeups: Wakeups) -> None:
        """Until cancelled, on the loop's own connection: LISTEN on the table's channel; each
        NOTIFY goes to ``heard``. Every ``ORPHANS_EVERY`` while watches wait (a killed leader
        announces nothing), else every ``check_interval``, it wakes those whose record's lock
        is free, which also tells that its session lives (a dead one receives nothing). Once
        that has ended, it listens again, with backoff, and wakes every watch (what was
        announced meanwhile was missed)."""

        followed = self._followed.get()  # the loop's: never replaced

        async def heard(*args: Any) -> None:
            """A NOTIFY (the driver runs each in a task of its own: its wake-up is not held up
            behind this task's check of the locks): a record's id (its leader ended), then the
            ttl and value recorded if they fit, kept for the record's watches (a woken
            follower's claim serves it without a round trip); or a JSON reset."""
            message = args[3]
            if message.startswith("{"):
                self._news.pop()
                wakeups.announced(message, _record, self.heard)
                return
            record, _, news = message.partition(" ")
            if news and any(r == record for _, r in followed):
                ttl, _, value = news.partition(" ")
                kept = (value, anyio.current_time(), math.inf if ttl == "-" else float(ttl))
                self._news.get()[record] = kept
            wakeups.wake(record)

        async def listen(conn: Any) -> Any:
            await conn.add_listener(self._channel, heard)
            return conn

        async def free(conn: Any) -> Any:  # which of the locks followed no session holds
            locks = sorted({k for k, _ in followed})
            return await conn.fetchval(_FREE, locks, timeout=self.check_interval)

        failures = 0
        try:
            while True:
                conn: Any = None
                try:
                    conn = await self._connections.run(
                        "listening", listen, wait=math.inf, listener=True
                    )
                    failures = 0  # LISTEN has taken effect: no later NOTIFY is missed
                    wakeups.listening.set()
                    wakeups.wake_all()
                    checked = anyio.current_time()
                    while not conn.is_closed():  # else a failed statement ended it
                        await anyio.sleep(ORPHANS_EVERY)
                        if followed or anyio.current_time() - checked >= self.check_interval:
                            checked = anyio.current_time()
                            # On a pooled connection if a statement lent to the listener's holds
                            # it up: its NOTIFYs wait for that one, but a freed lock still wakes.
                            freed = await self._connections.run(
                                "checking the locks", free, wait=self.check_interval, listener=True
                            )
                            for lock, record in list(followed):
                                if lock in freed:
                                    wakeups.wake(record)
                except BackendError:
                    pass  # the server went away: listen again, after a backoff
                finally:
                    wakeups.listening.clear()
                    if conn is not None:
                        conn.terminate()
                await anyio.sleep(backoff(failures, cap=5.0))
                failures += 1
        finally:
            self._connections.end()
            self._news.pop()  # nothing wakes with them now

    def _lock_key(self, name: str, key: str) -> int:
        """The record's advisory lock key (a signed 64-bit integer) in the table's namespace."""
        return _lock_key(f"{self._namespace}\0{name}\0{key}")


def _decide(row: Any) -> Served | Cooling | Held | None:
    """A read's answer unless it is to lead: a value younger than the refresh age (or due,
    while another holds the lock or a failure cools down), else a cooldown, else the holder."""
    value, cool, holder = row["value"], row["cool_left"], row["holder"]
    cooling = cool is not None and cool > 0
    if value is not None and (not row["stale"] or holder is not None or cooling):
        return Served(str(value))
    if value is None and cooling:
        return Cooling(float(cool))
    return None if holder is None else Held(holder.removeprefix(APPLICATION))


def _record(name: str, key: str) -> str:
    """A record's id in NOTIFY payloads (a digest: any name fits the payload's limit)."""
    return hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()[:40]


def _lock_key(text: str) -> int:
    """An advisory lock key (a signed 64-bit integer) for ``text``."""
    digest = hashlib.sha256(f"fastapi_once\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
