"""MySQLBackend: the lease store on MySQL or MariaDB (the ``mysql`` extra: asyncmy).

Three InnoDB tables, created if missing: ``<table>``, one row per record (value, made, expires,
cooldown, and the lease: fence, deadline, holder); ``<table>_fence``, whose AUTO_INCREMENT ids
are the fencing tokens (durable; its newest row is never deleted, so a server that recomputes
the counter from ``MAX(id)`` at startup still grows it); ``<table>_events``, a short log of
leaders' ends and resets that each event loop's listener polls (MySQL has no LISTEN).

A lease is live while its row's deadline has not passed and ``GET_LOCK('fastapi_once.<hash of
database and table>.<fence>')`` (no key text) is held by the loop's lock session, one
connection holding every lease lock of the loop: a killed process or a restarted server ends
its leases at once. Claims take the row's lock (``INSERT ... ON DUPLICATE KEY UPDATE``) in a
transaction. Connections per loop: ``max_connections`` for statements (the listener borrows
one per poll) plus the lock session; every round trip is bounded by ``wait_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import ssl as ssl_module
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio

from .._errors import BackendError
from ._base import DEFAULT_MAX_VALUE_BYTES, DEFAULT_WAIT_TIMEOUT, Scrubber, backoff, seconds
from ._lease import StoreBackend
from ._store import Claim, Cooling, Held, Lease, Reset, Served, StoreUnavailableError
from ._store import Watch as _WatchBase
from ._wakeups import Listeners, Wakeups

try:
    import asyncmy  # type: ignore[import-untyped,unused-ignore]
    from asyncmy.constants.CLIENT import FOUND_ROWS  # type: ignore[import-untyped,unused-ignore]
    from asyncmy.errors import Error as DriverError  # type: ignore[import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised by test_backend_imports
    raise ImportError(
        "MySQLBackend needs the asyncmy driver: pip install 'fastapi-once[mysql]'"
    ) from exc

#: Seconds between the listener's polls while no follower waits (resets arrive within 1 s).
IDLE_POLL = 0.25
_SETTLE = 0.5  # seconds after which an event id is taken as having no earlier id still to commit
_PRUNE_EVERY, _KEEP_EVENTS = 30.0, 60.0  # seconds
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")
_LOGIN = {1044, 1045, 1049, 1251, 1698, 2059}  # login or database refused: not an outage
_GONE = {1040, 1053, 1152, 1158, 1159, 1160, 1161, 1205, 1213, 1927, 2002, 2003, 2006, 2013}
_RECORD = "value, made_at, expires_at, cool_until, holder"
_LIVE = "lease_until > NOW(6) AND IS_USED_LOCK(CONCAT(%s, fence)) IS NOT NULL"
_HELD = (
    "name = %s AND rkey = %s AND fence = %s AND lease_until > NOW(6) AND IS_USED_LOCK(%s) <=> %s"
)


@dataclass
class _Session:
    """A loop's lock session: the connection holding its leases' GET_LOCKs."""

    conn: Any
    id: int  # CONNECTION_ID(): IS_USED_LOCK() names the holder by it
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)  # one statement at a time
    dead: bool = False  # set when a statement on it failed: its locks are gone


@dataclass
class _Loop:
    """One event loop's connections; only that loop's thread touches it."""

    wakeups: Wakeups
    slots: asyncio.Semaphore  # bounds the statement connections open (idle or in use)
    idle: list[Any] = field(default_factory=list)
    session: _Session | None = None
    opening: asyncio.Lock = field(default_factory=asyncio.Lock)  # opens one session at a time
    kick: asyncio.Event = field(default_factory=asyncio.Event)  # a watch began: poll now
    closed: bool = False


class _Watch(_WatchBase):
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109
        await Wakeups.woken(self.event, timeout)
        self.event.clear()


class MySQLBackend(StoreBackend):
    """Runs a once once across every process that shares a MySQL or MariaDB database.

    Args:
        url: ``mysql://user:password@host[:port]/database`` (or ``mariadb://``), ``?ssl=true``
            for TLS. The password never shows in errors, logs or ``describe()``.
        table: the records' table (``<table>_fence`` and ``<table>_events`` beside it), in the
            URL's database: letters, digits and underscores, at most 51.
        wait_timeout: the longest a follower waits, and any one round trip takes, in seconds.
        lease: seconds a lease lives without renewal (a live leader renews it; a dead one's
            ends with its lock session at once).
        poll_interval: seconds between the listener's polls while followers wait.
        max_connections: statement connections per event loop (the lock session is one more).
        connect_timeout: seconds to open a connection.
        ssl: an ``ssl.SSLContext`` for TLS (e.g. with a private CA); overrides ``?ssl=``.

    Raises:
        ValueError: a bad URL or option (the message names it and the fix).
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = "fastapi_once",
        wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        ttl: float | None = None,
        lease: float = 10.0,
        poll_interval: float = 0.025,
        recheck_interval: float = 1.0,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self._scrub = Scrubber(url)
        self._args = _connect_args(url, self._scrub.shown)
        if ssl is not None:
            self._args["ssl"] = ssl
        if not isinstance(table, str) or not _TABLE.fullmatch(table):
            raise ValueError(
                f"MySQLBackend(table={table!r}): give a table name of at most 51 letters, "
                "digits and underscores, without a database (the URL names the database)"
            )
        if type(max_connections) is not int or max_connections < 1:
            raise ValueError(
                f"MySQLBackend(max_connections={max_connections!r}): an int, at least 1"
            )
        super().__init__(
            wait_timeout=wait_timeout,
            ttl=ttl,
            lease=lease,
            recheck_interval=recheck_interval,
            max_value_bytes=max_value_bytes,
        )
        self.table, self.max_connections = table, max_connections
        self.poll_interval: float = seconds("poll_interval", poll_interval)
        self.connect_timeout: float = seconds("connect_timeout", connect_timeout)
        digest = hashlib.sha256(f"{self._args['db']}\0{table}".encode()).hexdigest()[:20]
        self._lock_prefix = f"fastapi_once.{digest}."  # + fence: at most 53 characters
        self._trip = min(self.wait_timeout or math.inf, 300.0)  # seconds per round trip
        self._ready = False  # the tables exist
        self._poll = (
            f"SELECT id, name, rkey, origin FROM `{table}_events` WHERE id > %s ORDER BY id"
        )
        self._loops: dict[asyncio.AbstractEventLoop, _Loop] = {}
        self._listeners = Listeners(self._listen)

    def describe(self) -> str:
        """``MySQLBackend(<url with the password masked>, table=...)``."""
        return f"MySQLBackend({self._scrub.shown}, table={self.table})"

    # --- the store protocol -------------------------------------------------------------------

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """Read the record and, unless it has a value to serve or a live lease, take the lease."""
        here = self._here()
        t, where = self.table, (name, key)
        select = f"SELECT {_RECORD}, NOW(6), {_LIVE} FROM `{t}` WHERE name = %s AND rkey = %s"
        async with self._conn(here) as conn:
            rows = await self._q(conn, select, (self._lock_prefix, *where))
            found = _judge(rows[0] if rows else None, refresh)
            if found is not None:  # read without a lock: as good as with one
                return found
            await self._q(conn, "START TRANSACTION")
            await self._q(
                conn,
                f"INSERT INTO `{t}` (name, rkey) VALUES (%s, %s) "
                "ON DUPLICATE KEY UPDATE rkey = rkey",  # takes the row's lock until COMMIT
                where,
            )
            row = (await self._q(conn, select, (self._lock_prefix, *where)))[0]
            result: Claim | None = _judge(row, refresh)
            if result is None:  # the lease is free: take it
                await self._q(conn, f"INSERT INTO `{t}_fence` () VALUES ()")
                fence = int(conn.insert_id())
                lock = self._lock_prefix + str(fence)
                session = await self._session(here)
                await self._on(session, "SELECT GET_LOCK(%s, 0)", (lock,))
                await self._q(
                    conn,
                    f"UPDATE `{t}` SET fence = %s, holder = %s, lease_until = NOW(6) + "
                    "INTERVAL %s MICROSECOND WHERE name = %s AND rkey = %s",
                    (fence, holder[:255], _us(lease), *where),
                )
                result = Lease(name, key, fence, (lock, session))
            await self._q(conn, "COMMIT")
            return result

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """Extend ``lease``; False if it expired, was taken, or its lock session ended."""
        return await self._end(
            lease, "lease_until = NOW(6) + INTERVAL %s MICROSECOND", (_us(seconds),), False
        )

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """Record ``value`` and free ``lease`` if it is still held; wake the record's watches."""
        change = (
            "value = %s, made_at = NOW(6), expires_at = NOW(6) + INTERVAL %s MICROSECOND, "
            "cool_until = NULL, lease_until = NULL, holder = NULL"
        )
        return await self._end(lease, change, (value, _us(ttl)), True)

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """Record ``cooldown`` (keeping any value) and free ``lease`` if it is still held."""
        change = (
            "cool_until = COALESCE(NOW(6) + INTERVAL %s MICROSECOND, cool_until), "
            "lease_until = NULL, holder = NULL"
        )
        await self._end(lease, change, (_us(cooldown),), True)

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """Clear the value and cooldown of ``name``'s record(s) and announce the reset."""
        here, t = self._here(), self.table
        which = "name = %s" + ("" if key is None else " AND rkey = %s")
        async with self._conn(here) as conn:
            await self._q(
                conn,
                f"UPDATE `{t}` SET value = NULL, made_at = NULL, expires_at = NULL, "
                f"cool_until = NULL WHERE {which}",
                (name,) if key is None else (name, key),
            )
            await self._note(conn, name, key, origin)

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[_WatchBase]:
        """Register for changes of the record; the loop's listener polls for them."""
        here = self._here()
        here.kick.set()  # poll at the fast pace from now
        await here.wakeups.until_listening(1.0)
        with here.wakeups.waiter(f"{name}\0{key}") as event:
            yield _Watch(event)

    async def aclose(self) -> None:
        """Stop this loop's listener and close its connections (a later call opens new ones)."""
        await self._listeners.stop()

    # --- leases -------------------------------------------------------------------------------

    async def _end(self, lease: Lease, change: str, args: tuple[Any, ...], final: bool) -> bool:
        """Apply ``change`` to the record if ``lease`` is held; ``final``: then free it and
        wake the record's watches. Return whether it was held."""
        lock, session = lease.handle
        held = False
        if not session.dead:
            where = (lease.name, lease.key, lease.fence, lock, session.id)
            async with self._conn(self._here()) as conn:
                sql = f"UPDATE `{self.table}` SET {change} WHERE {_HELD}"
                held = await self._q(conn, sql, (*args, *where), rows=False) == 1
                if held and final:
                    await self._note(conn, lease.name, lease.key, None)
        if final and not session.dead:
            with contextlib.suppress(StoreUnavailableError, BackendError):
                await self._on(session, "SELECT RELEASE_LOCK(%s)", (lock,))
        return held

    async def _note(self, conn: Any, name: str, key: str | None, origin: str | None) -> None:
        """Log a record's change for every process's listener (origin: a reset's)."""
        sql = (
            f"INSERT INTO `{self.table}_events` (at, name, rkey, origin) "
            "VALUES (NOW(6), %s, %s, %s)"
        )
        await self._q(conn, sql, (name, key, origin))

    async def _session(self, here: _Loop) -> _Session:
        """The loop's lock session, opened if it has none (or its last one failed)."""
        async with here.opening:
            session = here.session
            if session is None or session.dead:
                conn = await self._connect()
                rows = await self._q(conn, "SELECT CONNECTION_ID()")
                await self._q(conn, "SET SESSION wait_timeout = 31536000")  # idle for long
                if here.closed:
                    conn.close()
                    raise StoreUnavailableError(f"{self.describe()}: closed")
                session = here.session = _Session(conn, int(rows[0][0]))
            return session

    async def _on(self, session: _Session, sql: str, args: tuple[Any, ...]) -> None:
        """Run a lock statement on the session: whole (shielded, ~1 s at most) or not at all;
        a failure ends the session, and with it every lease lock it held."""
        async with session.busy:
            if session.dead:
                raise StoreUnavailableError(f"{self.describe()}: the lock session ended")
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(min(self._trip, 1.0)):
                        async with session.conn.cursor() as cur:
                            await cur.execute(sql, args)
                            row = await cur.fetchone()
                except BaseException as exc:
                    session.dead = True
                    session.conn.close()
                    raise self._error(exc) from exc
        if row is None or row[0] != 1:
            raise BackendError(f"{self.describe()}: a lease lock was refused")

    # --- connections --------------------------------------------------------------------------

    def _here(self) -> _Loop:
        """The running loop's connections, and its listener started if it is not running."""
        loop = asyncio.get_running_loop()
        wakeups = self._listeners.start()
        here = self._loops.get(loop)
        if here is None or here.wakeups is not wakeups:
            here = self._loops[loop] = _Loop(wakeups, asyncio.Semaphore(self.max_connections))
        return here

    async def _connect(self) -> Any:
        try:
            with anyio.fail_after(self.connect_timeout):
                conn = await asyncmy.connect(
                    **self._args,
                    autocommit=True,
                    client_flag=FOUND_ROWS,
                    connect_timeout=self.connect_timeout,
                )
        except BaseException as exc:
            raise self._error(exc) from exc
        try:
            waits = math.ceil(self._trip)
            await self._q(
                conn,
                "SET SESSION time_zone = '+00:00', sql_notes = 0, innodb_lock_wait_timeout = %s, "
                "lock_wait_timeout = %s",
                (waits, waits),
            )
            await self._q(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            if not self._ready:
                for ddl in _tables(self.table):
                    await self._q(conn, ddl)
                self._ready = True
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.asynccontextmanager
    async def _conn(self, here: _Loop) -> AsyncIterator[Any]:
        """A statement connection of the loop for the block: closed if the block fails (a
        transaction left open rolls back), else kept for the next block."""
        async with here.slots:
            conn = here.idle.pop() if here.idle else await self._connect()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if here.closed:
                conn.close()
            else:
                here.idle.append(conn)

    async def _q(self, conn: Any, sql: str, args: Any = (), *, rows: bool = True) -> Any:
        """One round trip, bounded; its rows (or, ``rows=False``, the rows it changed)."""
        try:
            with anyio.fail_after(self._trip):
                async with conn.cursor() as cur:
                    changed = await cur.execute(sql, args)
                    return list(await cur.fetchall()) if rows else changed
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> BaseException:
        """The store's exception for a driver's (its type and code, never its text)."""
        if not isinstance(exc, Exception) or isinstance(exc, BackendError):
            return exc
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        what = f"{type(exc).__name__}" + ("" if code is None else f" {code}")
        if code in _LOGIN:
            return BackendError(
                f"{self.describe()}: the server refused the login or the database ({what}); "
                "check the user, password and database in the URL"
            )
        lost = not code and isinstance(exc, DriverError)
        if isinstance(exc, (OSError, asyncio.IncompleteReadError)) or code in _GONE or lost:
            return StoreUnavailableError(f"{self.describe()}: cannot be reached ({what})")
        return BackendError(f"{self.describe()}: the server failed a statement ({what})")

    # --- the listener -------------------------------------------------------------------------

    async def _listen(self, wakeups: Wakeups) -> None:
        """Poll the events log: wake the watches of changed records, hear resets. Ends with
        its loop (or aclose), closing the loop's connections."""
        loop = asyncio.get_running_loop()
        here = self._loops[loop]
        floor: int | None = None  # every event at or below it has been handled
        seen: dict[int, float] = {}  # events above the floor handled, and when
        last_ok = pruned = time.monotonic()  # since when events may not have been polled
        failures = 0
        try:
            while True:
                try:
                    async with self._conn(here) as conn:
                        if floor is None:  # (re)starting: events since the last poll
                            back = time.monotonic() - last_ok + (1.0 if failures else 0.0)
                            floor = await self._floor(conn, min(back, _KEEP_EVENTS))
                        events = await self._q(conn, self._poll, (floor,))
                        if time.monotonic() - pruned > _PRUNE_EVERY:
                            await self._prune(conn)
                            pruned = time.monotonic()
                except (StoreUnavailableError, BackendError):
                    floor = None
                    wakeups.listening.clear()
                    wakeups.wake_all()  # changes may have been missed
                    await anyio.sleep(backoff(failures))
                    failures += 1
                    continue
                now = last_ok = time.monotonic()
                failures = 0
                for event_id, name, key, origin in events:
                    if event_id in seen:
                        continue
                    seen[event_id] = now
                    if origin is not None:
                        self.heard(Reset(name, key, origin))
                    if key is None:
                        wakeups.wake_all()
                    else:
                        wakeups.wake(f"{name}\0{key}")
                settled = [i for i, at in seen.items() if now - at > _SETTLE]
                if settled:
                    floor = max(floor, *settled)
                    seen = {i: at for i, at in seen.items() if i > floor}
                wakeups.listening.set()
                pace = self.poll_interval if wakeups.waiting() else IDLE_POLL
                with anyio.move_on_after(pace):
                    await here.kick.wait()
                here.kick.clear()
        finally:
            here.closed = True
            if self._loops.get(loop) is here:
                del self._loops[loop]
            for conn in here.idle:
                conn.close()
            if here.session is not None:
                here.session.dead = True
                here.session.conn.close()

    async def _floor(self, conn: Any, back: float) -> int:
        sql = (
            f"SELECT id FROM `{self.table}_events` WHERE at < NOW(6) - INTERVAL %s "
            "MICROSECOND ORDER BY at DESC LIMIT 1"
        )
        rows = await self._q(conn, sql, (_us(back),))
        return int(rows[0][0]) if rows else 0

    async def _prune(self, conn: Any) -> None:
        """Drop old events, and every fence but the newest (which keeps the counter up)."""
        t = self.table
        sql = f"DELETE FROM `{t}_events` WHERE at < NOW(6) - INTERVAL %s SECOND LIMIT 1000"
        await self._q(conn, sql, (int(_KEEP_EVENTS),), rows=False)
        newest = (await self._q(conn, f"SELECT MAX(id) FROM `{t}_fence`"))[0][0]
        if newest is not None:
            sql = f"DELETE FROM `{t}_fence` WHERE id < %s LIMIT 1000"
            await self._q(conn, sql, (newest,), rows=False)


def _judge(row: Any, refresh: float | None) -> Served | Cooling | Held | None:
    """What a claim finds in ``row`` (None: no value to serve and the lease free)."""
    if row is None:
        return None
    value, made, expires, cool, holder, now, live = row
    if expires is not None and expires <= now:
        value = None
    cooling = cool is not None and cool > now
    if value is not None:
        fresh = refresh is None or (now - made).total_seconds() < refresh
        if fresh or live or cooling:
            return Served(value)
    elif cooling:
        return Cooling((cool - now).total_seconds())
    return Held(holder) if live else None


def _us(value: float | None) -> int | None:
    """Seconds as whole microseconds, for ``INTERVAL ... MICROSECOND`` (None stays NULL)."""
    return None if value is None else round(value * 1_000_000)


def _tables(t: str) -> list[str]:
    """The tables' DDL (created if missing)."""
    name = "VARCHAR(700) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
    key = "VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin"
    return [
        f"CREATE TABLE IF NOT EXISTS `{t}` (name {name}, rkey {key} NOT NULL, "
        "value LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, made_at DATETIME(6), "
        "expires_at DATETIME(6), cool_until DATETIME(6), fence BIGINT, lease_until DATETIME(6),"
        " holder VARCHAR(255), PRIMARY KEY (name, rkey)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
        f"CREATE TABLE IF NOT EXISTS `{t}_fence` (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY)"
        " ENGINE=InnoDB",
        f"CREATE TABLE IF NOT EXISTS `{t}_events` (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY "
        f"KEY, at DATETIME(6) NOT NULL, name {name}, rkey {key}, origin VARCHAR(255), KEY (at))"
        " ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
    ]


def _connect_args(url: str, shown: str) -> dict[str, Any]:
    """asyncmy.connect()'s arguments for ``url``; ValueError naming what is wrong."""
    parts = urlsplit(url)
    fix = "give mysql://user:password@host:3306/database"
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ValueError(f"MySQLBackend({shown!r}): not a mysql:// or mariadb:// URL; {fix}")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ValueError(f"MySQLBackend({shown!r}): the port is not a number; {fix}") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database or "/" in database:
        raise ValueError(f"MySQLBackend({shown!r}): the URL needs a host and a database; {fix}")
    args: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "db": database,
        "charset": "utf8mb4",
    }
    for option, value in parse_qsl(parts.query, keep_blank_values=True):
        if option != "ssl" or value not in ("true", "false"):
            raise ValueError(f"MySQLBackend({shown!r}): unknown option {option}=; {fix}[?ssl=true]")
        args["ssl"] = ssl_module.create_default_context() if value == "true" else None
    return args
