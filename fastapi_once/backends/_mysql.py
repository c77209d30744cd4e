"""MySQLBackend: the lease store on MySQL or MariaDB (asyncmy, the ``mysql`` extra).

A lease is live while its row's deadline has not passed and its ``GET_LOCK`` (named after the
database, table and fence: no key text) is held by the loop's lock session, which a killed
process or a restarted server ends at once. MySQL has no LISTEN: each loop's listener polls an
events log (and prunes the tables). The tables and their pruning: ``docs/across.md``.
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
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio

from .._errors import BackendError
from ._base import Scrubber, backoff, error_code, seconds, store_errors, whole
from ._lease import LeaseOptions, StoreBackend
from ._store import Claim, Cooling, Held, Lease, Reset, Served, StoreUnavailableError, Watch
from ._wakeups import Listeners, ListenerWatch, Wakeups

try:
    import asyncmy  # type: ignore[import-untyped,unused-ignore]
    from asyncmy.constants.CLIENT import FOUND_ROWS  # type: ignore[import-untyped,unused-ignore]
    from asyncmy.errors import Error as DriverError  # type: ignore[import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised by test_backend_imports
    raise ImportError(
        "MySQLBackend needs the asyncmy driver: pip install 'fastapi-once[mysql]'"
    ) from exc

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: Seconds between the listener's polls while no follower waits (resets arrive within 1 s).
IDLE_POLL = 0.25
_PRUNE_EVERY, _KEEP_EVENTS, _BATCH = 30.0, 60.0, 500  # seconds, seconds, rows
_LATE = 1.0  # seconds an event may commit after one with a larger id (drawn after its own)
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")
_LIVE = "lease_until > NOW(6) AND IS_USED_LOCK(CONCAT(%s, fence)) IS NOT NULL"
# Nothing to serve (a row without a value expires when made), no cooldown, no live lease.
_DEAD = (
    "expires_at <= NOW(6) AND IFNULL(cool_until <= NOW(6), 1) AND IFNULL(lease_until <= NOW(6), 1)"
)
_LOGIN = {1044, 1045, 1049, 1251, 1698, 2059}  # login or database refused: not an outage
_GONE = {1040, 1053, 1152, 1158, 1159, 1160, 1161, 1205, 1213, 1927, 2002, 2003, 2006, 2013}


class MySQLBackend(StoreBackend):
    """Runs a once once across every process that shares a MySQL or MariaDB database.

    Args:
        url: ``mysql://user:password@host[:port]/database`` (or ``mariadb://``), ``?ssl=true``
            for TLS. The password never shows in errors, logs or ``describe()``.
        table: the records' table (``<table>_fence`` and ``<table>_events`` beside it), in the
            URL's database: letters, digits and underscores, at most 51.
        poll_interval: seconds between the listener's polls while followers wait.
        max_connections: statement connections per event loop (the lock session is one more).
        connect_timeout: seconds to open a connection.
        ssl: an ``ssl.SSLContext`` for TLS (e.g. with a private CA); overrides ``?ssl=``.
        wait_timeout, ttl, lease, recheck_interval, max_value_bytes: as ``StoreBackend``'s
            (``wait_timeout`` also bounds every round trip; a dead leader's lease ends with its
            lock session at once).

    Raises:
        ValueError: a bad URL or option (the message names it and the fix).
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = "fastapi_once",
        poll_interval: float = 0.025,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        **options: Unpack[LeaseOptions],
    ) -> None:
        if not isinstance(table, str) or not _TABLE.fullmatch(table):
            raise ValueError(
                f"MySQLBackend(table={table!r}): give a table name of at most 51 letters, "
                "digits and underscores, without a database (the URL names the database)"
            )
        super().__init__(**options)
        self.table = table
        self._shown = f"MySQLBackend({Scrubber(url).shown}, table={table})"
        self.max_connections = whole("MySQLBackend", "max_connections", max_connections, least=1)
        self.poll_interval: float = seconds("poll_interval", poll_interval)
        self._trip = min(self.wait_timeout or math.inf, 300.0)  # a round trip's bound
        self._connect_timeout = seconds("connect_timeout", connect_timeout)
        self._args = _connect_args(url, self._shown, ssl)
        self._sql = _statements(table, math.ceil(self._trip))
        # A new connection's first statements; until one has made the tables, these too (a
        # CREATE TABLE that finds its table still runs cluster-wide: binlog, Galera).
        self._init = f"{self._sql['session']}; {self._sql['tables']}"
        self._loops: dict[Wakeups, _Loop] = {}  # each loop's connections, by its listener
        digest = hashlib.sha256(f"{self._args['db']}\0{table}".encode()).hexdigest()[:20]
        self._lock_prefix = f"fastapi_once.{digest}."  # + fence: at most 53 characters
        self._listeners = Listeners(self._listen)

    def describe(self) -> str:
        """``MySQLBackend(<url with the password masked>, table=...)``."""
        return self._shown

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """See ``LeaseStore.claim``: a read, then (unless it decides) a transaction."""
        db, where = self._here(), (self._lock_prefix, name, key)
        async with self._lend(db) as conn:
            found = _judge(await self._run(conn, self._sql["read"], where), refresh)
            if found is not None:  # read without a lock: as good as with one
                return found
            # The row, made if missing, stays locked until COMMIT; read again under its lock.
            found = _judge(await self._run(conn, self._sql["lock"], (name, key, *where)), refresh)
            if found is not None:
                await self._run(conn, "COMMIT")
                return found
            await self._run(conn, self._sql["fence"])  # the lease is free: take it
            fence = int(conn.insert_id())
            lock = self._lock_prefix + str(fence)
            session = await self._lock(db, "SELECT GET_LOCK(%s, 0)", lock)
            args = (fence, holder[:255], _us(lease), name, key)
            try:
                await self._run(conn, self._sql["take"], args)  # and COMMIT
            except BaseException:  # the row's lease rolled back: its lock is let go too
                with anyio.CancelScope(shield=True), contextlib.suppress(BackendError):
                    await self._lock(db, "SELECT RELEASE_LOCK(%s)", lock, session)
                raise
        return Lease(name, key, fence, (lock, session))

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """See ``LeaseStore.renew``: False also when its lock session ended."""
        return await self._end(lease, "renew", (_us(seconds),), final=False)

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """See ``LeaseStore.complete``."""
        return await self._end(lease, "complete", (value, _us(ttl)), final=True)

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """See ``LeaseStore.abandon``."""
        await self._end(lease, "abandon", (_us(cooldown),), final=True)

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """See ``LeaseStore.clear``: the reset goes to the events log."""
        async with self._lend(self._here()) as conn:
            await self._run(conn, self._sql["clear"], (name, key, name, key, origin))

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[Watch]:
        """See ``LeaseStore.watch``: the loop's listener polls at its fast pace from now."""
        self._here().kick.set()
        with ListenerWatch(self._listeners, _record(name, key)) as watch:
            await watch.wakeups.until_listening(1.0)
            yield watch

    async def aclose(self) -> None:
        """See ``LeaseStore.aclose``."""
        await self._listeners.stop()

    async def _end(self, lease: Lease, change: str, args: tuple[Any, ...], final: bool) -> bool:
        """Run the ``change`` statement if ``lease`` is held, and whether it was (``final``:
        the statement tells the listeners of the leader's end; free the lock too)."""
        (lock, session), db, held = lease.handle, self._here(), False
        if session.connected:  # else its locks are gone
            where = (lease.name, lease.key, lease.fence, self._lock_prefix)
            args = (*args, *where, *(where[:2] if final else ()))
            async with self._lend(db) as conn:
                held = await self._run(conn, self._sql[change], args, rows=False) == 1
            if final:
                with contextlib.suppress(BackendError):
                    await self._lock(db, "SELECT RELEASE_LOCK(%s)", lock, session)
        return held

    def _here(self, wakeups: Wakeups | None = None) -> _Loop:
        """The connections of the running loop's listener (started if it is not running)."""
        wakeups = wakeups or self._listeners.start()
        if wakeups not in self._loops:
            self._loops[wakeups] = _Loop(asyncio.Semaphore(self.max_connections))
        return self._loops[wakeups]

    async def _listen(self, wakeups: Wakeups) -> None:
        """Poll the events log, waking watches and hearing resets; prune now and then. Ends with
        its loop (or aclose), closing the loop's connections.

        Events are read by id, not by the server's time (which a clock set back, or a failover
        to a server whose clock is behind, moves back): each poll reads those after the newest
        id a poll saw ``_LATE`` or more before it began, and handles those the last did not.
        """
        db = self._here(wakeups)
        after: int | None = None  # the events after this id are read (none at the first poll)
        mark = (math.inf, 0)  # when a poll answered, and the newest id then: the next ``after``
        seen: set[int] = set()  # the events the last poll read: the next one reads them again
        pruned, failures = time.monotonic(), 0
        try:
            while True:
                sent = time.monotonic()
                try:
                    async with self._lend(db) as conn:
                        rows = await self._run(conn, self._sql["poll"], (after,))
                except BackendError:  # StoreUnavailableError among them
                    wakeups.listening.clear()
                    wakeups.wake_all()  # changes may have been missed
                    await anyio.sleep(backoff(failures))
                    failures += 1
                    continue
                top, lost, failures = rows[0][0], failures > 0, 0
                if after is None:  # the start: the events before it are not this listener's
                    after, mark = top, (time.monotonic(), top)
                elif top < after:  # the newest events are gone: pruned (a clock set back dates
                    # them before older ones), or, after an outage, the ids started again (a log
                    # emptied, then a restart): those in the log came since, the next poll reads
                    # them all (after a failover that lost the newest, some come again).
                    after, mark = (0 if lost else top), (time.monotonic(), top)
                elif mark[0] <= sent - _LATE:  # every id up to the mark's was committed by then
                    after, mark = mark[1], (time.monotonic(), top)
                for _, event_id, name, key, origin in rows:
                    if event_id is None or event_id in seen:
                        continue
                    if origin is None:  # a leader's end
                        wakeups.wake(_record(name, key))
                    else:
                        wakeups.announce(Reset(name, key, origin), _record, self.heard)
                seen = {row[1] for row in rows}
                wakeups.listening.set()
                if time.monotonic() - pruned > _PRUNE_EVERY:  # after the wake-ups
                    pruned = time.monotonic()
                    with contextlib.suppress(BackendError):  # the next poll tells an outage
                        if await self._prune(db):
                            pruned = -math.inf  # a batch was full: the next one at the next poll
                pace = self.poll_interval if wakeups.waiting() else IDLE_POLL
                with anyio.move_on_after(pace):
                    await db.kick.wait()
                db.kick.clear()
        finally:  # the loop's connections close (those lent when given back)
            db.closed = True
            for conn in filter(None, [db.session, *db.idle]):
                conn.close()
            db.idle.clear()
            self._loops.pop(wakeups, None)

    async def _prune(self, db: _Loop) -> bool:
        """Delete a batch of each: records with nothing left, old events, all fences but the
        newest (it keeps the counter up across restarts). Whether a batch was full."""
        async with self._lend(db) as conn:
            deleted: list[int] = [
                await self._run(conn, self._sql[which], (*args, _BATCH), rows=False)
                for which, args in (("dead", ()), ("old", (_us(_KEEP_EVENTS),)), ("fences", ()))
            ]
        return max(deleted) >= _BATCH

    async def _connect(self) -> Any:
        """A new connection (see ``_init``); the driver closes it if connecting fails."""
        with self._errors("connecting"), anyio.fail_after(self._connect_timeout):
            conn = await asyncmy.connect(
                **self._args,
                autocommit=True,
                client_flag=FOUND_ROWS,  # UPDATE counts the rows it matched
                connect_timeout=self._connect_timeout,
                init_command=self._init,
            )
        self._init = self._sql["session"]  # the tables exist
        return conn

    @contextlib.asynccontextmanager
    async def _lend(self, db: _Loop) -> AsyncIterator[Any]:
        """A connection of ``db`` for the block, closed if it fails (an open transaction ends)."""
        async with db.slots:
            conn = db.idle.pop() if db.idle else await self._connect()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if db.closed:
                conn.close()
            else:
                db.idle.append(conn)

    async def _run(
        self, conn: Any, sql: str, args: Any = (), *, rows: bool = True, trip: float = math.inf
    ) -> Any:
        """One round trip (bounded) of one statement or several, and the last one's rows
        (``rows=False``: how many the first one matched)."""
        with self._errors("running a statement"), anyio.fail_after(min(trip, self._trip)):
            async with conn.cursor() as cur:
                matched = await cur.execute(sql, args)
                while await cur.nextset():  # the next statement's result (its error raises)
                    pass
                return list(await cur.fetchall()) if rows else matched

    async def _lock(self, db: _Loop, sql: str, name: str, session: Any = None) -> Any:
        """Run a lock statement (``GET_LOCK``, ``RELEASE_LOCK``) on ``session`` (by default the
        loop's, opened if it has none or its last one ended), whole (shielded, 1 s at most) or
        not at all, and return the session; BackendError unless it answered 1. A failure closes
        the session, and so frees every lock it held."""
        async with db.locking:
            if session is None and not (db.session and db.session.connected):
                db.session = await self._connect()
                if db.closed:  # the loop's listener ended meanwhile: so did its lock session
                    db.session.close()
                    raise StoreUnavailableError(f"{self.describe()}: the lock session ended")
            session = session or db.session
            with anyio.CancelScope(shield=True):
                try:
                    rows = await self._run(session, sql, (name,), trip=1.0)
                except BaseException:
                    session.close()
                    raise
        if rows != [(1,)]:
            raise BackendError(f"{self.describe()}: the server refused a lock statement")
        return session

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """The driver's errors in the block as the store's (their type and code, never text)."""
        return store_errors(self._shown, doing, Exception, outage=_outage, refused=_refused)


@dataclass
class _Loop:
    """One event loop's connections (only that loop's thread touches them)."""

    slots: asyncio.Semaphore  # statement connections, idle or lent: at most max_connections
    idle: list[Any] = field(default_factory=list)
    session: Any = None  # the lock session: its locks live while it is connected
    locking: asyncio.Lock = field(default_factory=asyncio.Lock)  # one statement on it at once
    kick: asyncio.Event = field(default_factory=asyncio.Event)  # a watch began: poll now
    closed: bool = False  # the loop's listener ended: connections given back close


def _statements(t: str, waits: int) -> dict[str, str]:
    """The store's statements on the tables named after ``t``, made once per backend (``%s``:
    the arguments; ``waits``: the server's lock waits, in seconds)."""
    read = (  # what a claim decides on (see _judge): the lock prefix, name, key
        "SELECT IF(IFNULL(expires_at > NOW(6), 1), value, NULL), TIMESTAMPDIFF(MICROSECOND, "
        f"made_at, NOW(6)), TIMESTAMPDIFF(MICROSECOND, NOW(6), cool_until), holder, {_LIVE} "
        f"FROM `{t}` WHERE name = %s AND rkey = %s"
    )
    # The name, key, fence and lock prefix of a lease still held (lock names are unique).
    held = f"WHERE name = %s AND rkey = %s AND fence = %s AND {_LIVE}"
    # A record's change (a reset and its origin, or a leader's end), for every listener.
    event = f"INSERT INTO `{t}_events` (at, name, rkey, origin) SELECT NOW(6), %s, %s, "
    end = f"; {event}NULL FROM DUAL WHERE ROW_COUNT() = 1"  # if the lease was held
    until = "NOW(6) + INTERVAL %s MICROSECOND"
    name = "VARCHAR(700) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
    key = "VARCHAR(40) CHARACTER SET ascii COLLATE ascii_bin"
    return {
        "read": read,
        "lock": f"START TRANSACTION; INSERT INTO `{t}` (name, rkey, expires_at) VALUES "
        f"(%s, %s, NOW(6)) ON DUPLICATE KEY UPDATE rkey = rkey; {read}",
        "fence": f"INSERT INTO `{t}_fence` () VALUES ()",
        "take": f"UPDATE `{t}` SET fence = %s, holder = %s, lease_until = {until} "
        "WHERE name = %s AND rkey = %s; COMMIT",
        "renew": f"UPDATE `{t}` SET lease_until = {until} {held}",
        "complete": f"UPDATE `{t}` SET value = %s, made_at = NOW(6), expires_at = {until}, "
        f"cool_until = NULL, lease_until = NULL, holder = NULL {held}{end}",
        "abandon": f"UPDATE `{t}` SET cool_until = COALESCE({until}, cool_until), "
        f"lease_until = NULL, holder = NULL {held}{end}",
        "clear": f"UPDATE `{t}` SET value = NULL, made_at = NULL, expires_at = NOW(6), "
        f"cool_until = NULL WHERE name = %s AND rkey = COALESCE(%s, rkey); {event}%s",
        # The newest id, then the events after the id given (none for NULL), by id.
        "poll": f"SELECT m.top, e.id, e.name, e.rkey, e.origin FROM (SELECT IFNULL(MAX(id), "
        f"0) AS top FROM `{t}_events`) AS m LEFT JOIN `{t}_events` AS e ON e.id > %s "
        "ORDER BY e.id",
        "dead": f"DELETE FROM `{t}` WHERE {_DEAD} LIMIT %s",
        "old": f"DELETE FROM `{t}_events` WHERE at < NOW(6) - INTERVAL %s MICROSECOND LIMIT %s",
        # A derived table, which MySQL reads whole before it deletes from the same table.
        "fences": f"DELETE FROM `{t}_fence` WHERE id < (SELECT top FROM (SELECT MAX(id) AS "
        f"top FROM `{t}_fence`) AS f) LIMIT %s",
        # A new connection's: UTC, READ COMMITTED, the server's lock waits bounded, an idle
        # timeout of a year (a lock session, or a kept connection, may idle).
        "session": "SET SESSION time_zone = '+00:00', sql_notes = 0, wait_timeout = 31536000, "
        f"innodb_lock_wait_timeout = {waits}, lock_wait_timeout = {waits}; "
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "tables": f"CREATE TABLE IF NOT EXISTS `{t}` (name {name}, rkey {key} NOT NULL, value "
        "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, made_at DATETIME(6), expires_at "
        "DATETIME(6), cool_until DATETIME(6), fence BIGINT, lease_until DATETIME(6), holder "
        "VARCHAR(255), PRIMARY KEY (name, rkey), KEY (expires_at)) ENGINE=InnoDB "
        f"ROW_FORMAT=DYNAMIC; CREATE TABLE IF NOT EXISTS `{t}_fence` (id BIGINT NOT NULL "
        f"AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB; CREATE TABLE IF NOT EXISTS `{t}_events` "
        f"(id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, at DATETIME(6) NOT NULL, name {name}"
        f", rkey {key}, origin VARCHAR(255), KEY (at)) ENGINE=InnoDB ROW_FORMAT=DYNAMIC",
    }


def _record(name: str, key: str) -> str:  # a record's name for the listener and the watches
    return f"{name}\0{key}"


def _judge(rows: list[Any], refresh: float | None) -> Served | Cooling | Held | None:
    """What a claim finds in a read's ``rows`` (None: no value to serve and the lease free)."""
    if not rows:
        return None
    value, age, cool, holder, live = rows[0]  # the value unless expired; age, cooldown left: µs
    cooling = cool is not None and cool > 0
    if value is not None and (refresh is None or age < _us(refresh) or live or cooling):
        return Served(value)
    if value is None and cooling:
        return Cooling(cool / 1_000_000)
    return Held(holder) if live else None


def _us(value: float | None) -> int | None:
    """Seconds as whole microseconds, for ``INTERVAL ... MICROSECOND`` (None stays NULL)."""
    return None if value is None else round(value * 1_000_000)


def _outage(exc: Exception) -> bool:
    lost = not error_code(exc) and isinstance(exc, DriverError)  # e.g. a closed connection's 0
    return (
        isinstance(exc, (OSError, asyncio.IncompleteReadError)) or error_code(exc) in _GONE or lost
    )


def _refused(exc: Exception) -> bool:
    return error_code(exc) in _LOGIN


def _connect_args(url: str, shown: str, ssl: ssl_module.SSLContext | None) -> dict[str, Any]:
    """asyncmy.connect()'s arguments for ``url`` (``shown``: it without the password; ``ssl``
    overrides ``?ssl=``); ValueError naming the fix for a URL it cannot use."""
    parts, fix = urlsplit(url), "give mysql://user:password@host:3306/database"
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ValueError(f"{shown}: not a mysql:// or mariadb:// URL; {fix}")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ValueError(f"{shown}: the port is not a number; {fix}") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database or "/" in database:
        raise ValueError(f"{shown}: the URL needs a host and a database; {fix}")
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
            raise ValueError(f"{shown}: unknown option {option}=; {fix}[?ssl=true]")
        args["ssl"] = ssl_module.create_default_context() if value == "true" else None
    return args if ssl is None else {**args, "ssl": ssl}
