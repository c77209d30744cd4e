"""MySQLBackend's connections: the URL, opening and pooling connections, bounded round trips,
and the driver's errors as the store's (asyncmy: the ``mysql`` extra)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio

from .._errors import BackendError
from ._store import StoreUnavailableError

try:
    import asyncmy  # type: ignore[import-untyped,unused-ignore]
    from asyncmy.constants.CLIENT import FOUND_ROWS  # type: ignore[import-untyped,unused-ignore]
    from asyncmy.errors import Error as DriverError  # type: ignore[import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised by test_backend_imports
    raise ImportError(
        "MySQLBackend needs the asyncmy driver: pip install 'fastapi-once[mysql]'"
    ) from exc

_LOGIN = {1044, 1045, 1049, 1251, 1698, 2059}  # login or database refused: not an outage
_GONE = {1040, 1053, 1152, 1158, 1159, 1160, 1161, 1205, 1213, 1927, 2002, 2003, 2006, 2013}


@dataclass
class Pool:
    """One event loop's statement connections; only that loop's thread touches it."""

    slots: asyncio.Semaphore  # bounds the connections open, idle or in use
    idle: list[Any] = field(default_factory=list)
    closed: bool = False  # set when the loop's listener ended: connections given back close

    def close(self) -> None:
        """Close the idle connections; those in use close when given back."""
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()


@dataclass
class LockSession:
    """A connection that holds named locks (``GET_LOCK``) for as long as it lives."""

    conn: Any
    id: int  # CONNECTION_ID(): IS_USED_LOCK() names the holder by it
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)  # one statement at a time
    dead: bool = False  # a statement on it failed, or it was closed: its locks are gone

    def close(self) -> None:
        """Close the connection: the server frees its locks."""
        self.dead = True
        self.conn.close()


class Database:
    """Opens, lends and runs statements on connections to the database a URL names.

    Args:
        url: ``mysql://user:password@host[:port]/database`` or ``mariadb://...``, ``?ssl=true``.
        describe: the store's description, for messages (never the password).
        trip: the longest one round trip may take, in seconds (the server's lock waits too).
        connect_timeout: the longest opening a connection may take, in seconds.
        ssl: a TLS context, overriding ``?ssl=``.
        setup: statements run once on the first connection (the store's tables).

    Raises:
        ValueError: not such a URL, no host or database, a bad port, an unknown ``?option``.
    """

    def __init__(
        self,
        url: str,
        describe: Callable[[], str],
        *,
        trip: float,
        connect_timeout: float,
        ssl: ssl_module.SSLContext | None,
        setup: list[str],
    ) -> None:
        self.describe, self.trip, self.connect_timeout = describe, trip, connect_timeout
        self.args = _connect_args(url, describe())
        if ssl is not None:
            self.args["ssl"] = ssl
        self._setup = setup  # emptied once it has run

    async def connect(self) -> Any:
        """A new connection: autocommit, UTC, READ COMMITTED, lock waits bounded by ``trip``."""
        try:
            with anyio.fail_after(self.connect_timeout):
                conn = await asyncmy.connect(
                    **self.args,
                    autocommit=True,
                    client_flag=FOUND_ROWS,  # UPDATE counts the rows it matched
                    connect_timeout=self.connect_timeout,
                )
        except BaseException as exc:
            raise self.error(exc) from exc
        try:
            waits = math.ceil(self.trip)
            await self.run(
                conn,
                "SET SESSION time_zone = '+00:00', sql_notes = 0, "
                "innodb_lock_wait_timeout = %s, lock_wait_timeout = %s",
                (waits, waits),
            )
            await self.run(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            for statement in self._setup:
                await self.run(conn, statement)
            self._setup = []
        except BaseException:
            conn.close()
            raise
        return conn

    async def lock_session(self) -> LockSession:
        """A new lock session (the server's idle timeout raised: it may idle for long)."""
        conn = await self.connect()
        try:
            rows = await self.run(conn, "SELECT CONNECTION_ID()")
            await self.run(conn, "SET SESSION wait_timeout = 31536000")
        except BaseException:
            conn.close()
            raise
        return LockSession(conn, int(rows[0][0]))

    async def on(self, session: LockSession, sql: str, name: str) -> bool:
        """Run a lock statement (``GET_LOCK``, ``RELEASE_LOCK``) on ``session``, whole
        (shielded, 1 s at most) or not at all; return whether it answered 1. A failure ends the
        session, and with it every lock it held.

        Raises:
            StoreUnavailableError: the session has ended, or ends now.
        """
        async with session.busy:
            if session.dead:
                raise StoreUnavailableError(f"{self.describe()}: the lock session ended")
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(min(self.trip, 1.0)):
                        async with session.conn.cursor() as cur:
                            await cur.execute(sql, (name,))
                            row = await cur.fetchone()
                except BaseException as exc:
                    session.close()
                    raise self.error(exc) from exc
        return row is not None and row[0] == 1

    @contextlib.asynccontextmanager
    async def lend(self, pool: Pool) -> AsyncIterator[Any]:
        """A connection of ``pool`` for the block: closed if the block fails (a transaction left
        open rolls back), else kept for the next block."""
        async with pool.slots:
            conn = pool.idle.pop() if pool.idle else await self.connect()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if pool.closed:
                conn.close()
            else:
                pool.idle.append(conn)

    async def run(self, conn: Any, sql: str, args: Any = (), *, rows: bool = True) -> Any:
        """One round trip, bounded by ``trip``: its rows (``rows=False``: the rows it matched).

        Raises:
            StoreUnavailableError: no answer, or the connection is lost.
            BackendError: the server refused the statement.
        """
        try:
            with anyio.fail_after(self.trip):
                async with conn.cursor() as cur:
                    matched = await cur.execute(sql, args)
                    return list(await cur.fetchall()) if rows else matched
        except Exception as exc:
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> BaseException:
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


def _connect_args(url: str, shown: str) -> dict[str, Any]:
    """asyncmy.connect()'s arguments for ``url``; ValueError naming what is wrong."""
    parts = urlsplit(url)
    fix = "give mysql://user:password@host:3306/database"
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
    return args
