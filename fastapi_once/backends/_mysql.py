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

import anyio

from .._errors import BackendError
from ._base import DEFAULT_MAX_VALUE_BYTES, DEFAULT_WAIT_TIMEOUT, Scrubber, backoff, seconds
from ._lease import StoreBackend
from ._mysql_db import Database, LockSession, Pool
from ._store import Claim, Cooling, Held, Lease, Reset, Served, StoreUnavailableError
from ._store import Watch as _WatchBase
from ._wakeups import Listeners, Wakeups

#: Seconds between the listener's polls while no follower waits (resets arrive within 1 s).
IDLE_POLL = 0.25
_SETTLE = 0.5  # seconds after which an event id is taken as having no earlier id still to commit
_PRUNE_EVERY, _KEEP_EVENTS = 30.0, 60.0  # seconds
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")
_RECORD = "value, made_at, expires_at, cool_until, holder"
_LIVE = "lease_until > NOW(6) AND IS_USED_LOCK(CONCAT(%s, fence)) IS NOT NULL"
_HELD = (
    "name = %s AND rkey = %s AND fence = %s AND lease_until > NOW(6) AND IS_USED_LOCK(%s) <=> %s"
)


@dataclass
class _Loop:
    """One event loop's connections and listener; only that loop's thread touches it."""

    wakeups: Wakeups
    pool: Pool
    session: LockSession | None = None
    opening: asyncio.Lock = field(default_factory=asyncio.Lock)  # opens one session at a time
    kick: asyncio.Event = field(default_factory=asyncio.Event)  # a watch began: poll now


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
        self._db = Database(
            url,
            self.describe,
            trip=min(self.wait_timeout or math.inf, 300.0),
            connect_timeout=seconds("connect_timeout", connect_timeout),
            ssl=ssl,
            setup=_tables(table),
        )
        digest = hashlib.sha256(f"{self._db.args['db']}\0{table}".encode()).hexdigest()[:20]
        self._lock_prefix = f"fastapi_once.{digest}."  # + fence: at most 53 characters
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
        async with self._db.lend(here.pool) as conn:
            rows = await self._db.run(conn, select, (self._lock_prefix, *where))
            found = _judge(rows[0] if rows else None, refresh)
            if found is not None:  # read without a lock: as good as with one
                return found
            await self._db.run(conn, "START TRANSACTION")
            await self._db.run(
                conn,
                f"INSERT INTO `{t}` (name, rkey) VALUES (%s, %s) "
                "ON DUPLICATE KEY UPDATE rkey = rkey",  # takes the row's lock until COMMIT
                where,
            )
            row = (await self._db.run(conn, select, (self._lock_prefix, *where)))[0]
            result: Claim | None = _judge(row, refresh)
            if result is None:  # the lease is free: take it
                await self._db.run(conn, f"INSERT INTO `{t}_fence` () VALUES ()")
                fence = int(conn.insert_id())
                lock = self._lock_prefix + str(fence)
                session = await self._session(here)
                if not await self._db.on(session, "SELECT GET_LOCK(%s, 0)", lock):
                    raise BackendError(f"{self.describe()}: a lease lock was refused")
                await self._db.run(
                    conn,
                    f"UPDATE `{t}` SET fence = %s, holder = %s, lease_until = NOW(6) + "
                    "INTERVAL %s MICROSECOND WHERE name = %s AND rkey = %s",
                    (fence, holder[:255], _us(lease), *where),
                )
                result = Lease(name, key, fence, (lock, session))
            await self._db.run(conn, "COMMIT")
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
        async with self._db.lend(here.pool) as conn:
            await self._db.run(
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
            async with self._db.lend(self._here().pool) as conn:
                sql = f"UPDATE `{self.table}` SET {change} WHERE {_HELD}"
                held = await self._db.run(conn, sql, (*args, *where), rows=False) == 1
                if held and final:
                    await self._note(conn, lease.name, lease.key, None)
        if final and not session.dead:
            with contextlib.suppress(StoreUnavailableError, BackendError):
                await self._db.on(session, "SELECT RELEASE_LOCK(%s)", lock)
        return held

    async def _note(self, conn: Any, name: str, key: str | None, origin: str | None) -> None:
        """Log a record's change for every process's listener (origin: a reset's)."""
        sql = (
            f"INSERT INTO `{self.table}_events` (at, name, rkey, origin) "
            "VALUES (NOW(6), %s, %s, %s)"
        )
        await self._db.run(conn, sql, (name, key, origin))

    async def _session(self, here: _Loop) -> LockSession:
        """The loop's lock session, opened if it has none (or its last one failed)."""
        async with here.opening:
            session = here.session
            if session is None or session.dead:
                session = await self._db.lock_session()
                if here.pool.closed:  # the loop's listener ended meanwhile
                    session.close()
                    raise StoreUnavailableError(f"{self.describe()}: closed")
                here.session = session
            return session

    # --- connections --------------------------------------------------------------------------

    def _here(self) -> _Loop:
        """The running loop's connections, and its listener started if it is not running."""
        loop = asyncio.get_running_loop()
        wakeups = self._listeners.start()
        here = self._loops.get(loop)
        if here is None or here.wakeups is not wakeups:
            pool = Pool(asyncio.Semaphore(self.max_connections))
            here = self._loops[loop] = _Loop(wakeups, pool)
        return here

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
                    async with self._db.lend(here.pool) as conn:
                        if floor is None:  # (re)starting: events since the last poll
                            back = time.monotonic() - last_ok + (1.0 if failures else 0.0)
                            floor = await self._floor(conn, min(back, _KEEP_EVENTS))
                        events = await self._db.run(conn, self._poll, (floor,))
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
            here.pool.close()
            if self._loops.get(loop) is here:
                del self._loops[loop]
            if here.session is not None:
                here.session.close()

    async def _floor(self, conn: Any, back: float) -> int:
        sql = (
            f"SELECT id FROM `{self.table}_events` WHERE at < NOW(6) - INTERVAL %s "
            "MICROSECOND ORDER BY at DESC LIMIT 1"
        )
        rows = await self._db.run(conn, sql, (_us(back),))
        return int(rows[0][0]) if rows else 0

    async def _prune(self, conn: Any) -> None:
        """Drop old events, and every fence but the newest (which keeps the counter up)."""
        t = self.table
        sql = f"DELETE FROM `{t}_events` WHERE at < NOW(6) - INTERVAL %s SECOND LIMIT 1000"
        await self._db.run(conn, sql, (int(_KEEP_EVENTS),), rows=False)
        newest = (await self._db.run(conn, f"SELECT MAX(id) FROM `{t}_fence`"))[0][0]
        if newest is not None:
            sql = f"DELETE FROM `{t}_fence` WHERE id < %s LIMIT 1000"
            await self._db.run(conn, sql, (newest,), rows=False)


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
