"""MySQLBackend's connections (asyncmy, the ``mysql`` extra): the URL, one event loop's bounded
connections and lock session, round trips bounded in time, the driver's errors as the store's."""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl as ssl_module
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio

from ._base import store_errors
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


@dataclass(repr=False)  # args hold the password
class Database:
    """One event loop's connections (only that loop's thread touches them): at most ``size``
    for statements and one lock session; each round trip bounded by ``trip`` seconds."""

    args: dict[str, Any]  # asyncmy.connect()'s, from connect_args()
    name: str  # the store, for messages (never the password)
    trip: float
    connect_timeout: float
    setup: list[str]  # run on the backend's first connection (the tables), then emptied
    size: int
    idle: list[Any] = field(default_factory=list)
    session: Any = None  # the lock session: its locks live while it is connected
    closed: bool = False  # the loop's listener ended: connections given back close

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.size)  # statement connections, idle or lent
        self.locking = asyncio.Lock()  # one lock session opened, one statement on it, at once
        self.kick = asyncio.Event()  # a watch began: the loop's listener polls now

    async def connect(self) -> Any:
        """A new connection: autocommit, UTC, READ COMMITTED, the server's lock waits bounded by
        ``trip``, its idle timeout a year (a lock session, or a kept connection, may idle)."""
        waits = math.ceil(self.trip)
        with self.errors("connecting"), anyio.fail_after(self.connect_timeout):
            conn = await asyncmy.connect(
                **self.args,
                autocommit=True,
                client_flag=FOUND_ROWS,  # UPDATE counts the rows it matched
                connect_timeout=self.connect_timeout,
                init_command="SET SESSION time_zone = '+00:00', sql_notes = 0, wait_timeout "
                f"= 31536000, innodb_lock_wait_timeout = {waits}, lock_wait_timeout = {waits}",
            )
        try:
            for sql in ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", *self.setup):
                await self.run(conn, sql)
            self.setup.clear()
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.asynccontextmanager
    async def lend(self) -> AsyncIterator[Any]:
        """A connection for the block: closed if the block fails (a transaction left open rolls
        back), else kept for the next block."""
        async with self.slots:
            conn = self.idle.pop() if self.idle else await self.connect()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if self.closed:
                conn.close()
            else:
                self.idle.append(conn)

    async def run(
        self, conn: Any, sql: str, args: Any = (), *, rows: bool = True, trip: float = math.inf
    ) -> Any:
        """One round trip, bounded by ``trip`` (at most the loop's): its rows (``rows=False``:
        how many it matched).

        Raises:
            StoreUnavailableError: no answer, or the connection is lost.
            BackendError: the server refused the statement.
        """
        with self.errors("running a statement"), anyio.fail_after(min(trip, self.trip)):
            async with conn.cursor() as cur:
                matched = await cur.execute(sql, args)
                return list(await cur.fetchall()) if rows else matched

    async def lock(self, sql: str, name: str, session: Any = None) -> tuple[bool, Any]:
        """Run a lock statement (``GET_LOCK``, ``RELEASE_LOCK``) on ``session`` (by default the
        loop's, opened if it has none or its last one ended), whole (shielded, 1 s at most) or
        not at all: whether it answered 1, and the session. A failure closes the session, and
        so frees every lock it held.

        Raises:
            StoreUnavailableError: the session ended, or ends now.
        """
        async with self.locking:
            if session is None and not (self.session and self.session.connected):
                self.session = await self.connect()
                if self.closed:  # the loop's listener ended meanwhile
                    self.session.close()
            session = session or self.session
            if not session.connected:
                raise StoreUnavailableError(f"{self.name}: the lock session ended")
            with anyio.CancelScope(shield=True):
                try:
                    rows = await self.run(session, sql, (name,), trip=1.0)
                except BaseException:
                    session.close()
                    raise
        return rows == [(1,)], session

    def errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """The driver's errors in the block as the store's (their type and code, never text)."""
        return store_errors(self.name, doing, Exception, outage=_outage, refused=_refused)

    def close(self) -> None:
        """Close the idle connections and the lock session; those lent close when given back."""
        self.closed = True
        for conn in filter(None, [self.session, *self.idle]):
            conn.close()
        self.idle.clear()


def _code(exc: Exception) -> int | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None


def _refused(exc: Exception) -> bool:
    return _code(exc) in _LOGIN


def _outage(exc: Exception) -> bool:
    code = _code(exc)
    lost = not code and isinstance(exc, DriverError)
    return isinstance(exc, (OSError, asyncio.IncompleteReadError)) or code in _GONE or lost


def connect_args(url: str, shown: str, ssl: ssl_module.SSLContext | None) -> dict[str, Any]:
    """asyncmy.connect()'s arguments for ``url`` (``shown``: it without the password); ``ssl``,
    if given, overrides the URL's ``?ssl=``.

    Raises:
        ValueError: not a mysql:// or mariadb:// URL, no host or database, a bad port, an
            option other than ``?ssl=true|false``.
    """
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
    user, password = (unquote(part or "") for part in (parts.username, parts.password))
    args = {"host": parts.hostname, "port": port, "user": user, "password": password}
    args |= {"db": database, "charset": "utf8mb4"}
    for option, value in parse_qsl(parts.query, keep_blank_values=True):
        if option != "ssl" or value not in ("true", "false"):
            raise ValueError(f"{shown}: unknown option {option}=; {fix}[?ssl=true]")
        args["ssl"] = ssl_module.create_default_context() if value == "true" else None
    return args if ssl is None else {**args, "ssl": ssl}
