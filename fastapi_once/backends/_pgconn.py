"""The PostgreSQL store's connections per event loop (counted in ``docs/across.md``), its
DSN's arguments, and the driver's errors as store errors."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from ._base import Scrubber, store_errors

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgresBackend needs the asyncpg package: pip install 'fastapi-once[postgres]'"
    ) from exc

T = TypeVar("T")

#: Idle lock sessions a loop keeps for its next claims (a connection is a server process).
IDLE_SESSIONS = 4
#: The ``application_name`` prefix of the store's connections: tells followers who holds a lock.
APPLICATION = "fastapi_once "

#: The server cannot be reached or did not answer in time: :class:`StoreUnavailableError`.
OUTAGES = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cancelled, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.exceptions.LockNotAvailableError,
)
#: Every error of the driver: an outage, or the server refusing a statement.
DRIVER_ERRORS = (*OUTAGES, asyncpg.PostgresError)
# A statement the server cut off (statement_timeout, lock_timeout, pg_cancel_backend): an
# outage for the caller, but the connection is fine and the statement is not run again.
_CUT_OFF = (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)
# A refused login (InvalidPasswordError among them) or an unknown database.
_REFUSED = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)

# The libpq connection keywords taken in a ``key=value`` DSN: asyncpg.connect()'s arguments of
# the same name, or of the name given here.
_RENAMED = {"hostaddr": "host", "dbname": "database", "sslmode": "ssl"}
_KEYWORDS = {*_RENAMED, "host", "port", "user", "password", "passfile", "service"}
_KEYWORDS |= {"servicefile", "target_session_attrs", "krbsrvname", "gsslib"}
_CONNINFO = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)\s*")


class Connections:
    """One store's connections in each event loop (only the loop's own thread touches its
    entries), and how its driver errors read.

    Args:
        dsn: the store's URL or libpq ``key=value`` string.
        options: the rest of ``asyncpg.connect()``'s arguments (bounds, application_name).
        pool_size: the most pooled connections per loop.
        setup: run on every new connection's first use until it has made the tables.
        describe: the store's description, for errors.

    Raises:
        ValueError: a ``key=value`` string that cannot be parsed or has an unknown keyword.
    """

    def __init__(
        self,
        dsn: str,
        options: Callable[[], dict[str, Any]],
        pool_size: int,
        setup: Callable[[Any], Awaitable[None]],
        describe: Callable[[], str],
    ) -> None:
        self.scrub = Scrubber(dsn)
        self._args = connect_args(dsn, self.scrub)
        self._options, self._pool_size, self._setup = options, pool_size, setup
        self._describe = describe
        self._pools: dict[asyncio.AbstractEventLoop, Any] = {}
        # The loop's own connection (its listener's, lent to statements while free) and the
        # lock held by the statement that uses it; end() replaces the lock.
        self._own: dict[asyncio.AbstractEventLoop, Any] = {}
        self._using: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._out: dict[asyncio.AbstractEventLoop, set[Any]] = {}  # lock sessions not idle
        self._idle: dict[asyncio.AbstractEventLoop, list[Any]] = {}

    def errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """The driver's errors in the block as the store's (see ``_base.store_errors``)."""
        return store_errors(
            self._describe(), doing, DRIVER_ERRORS, outage=OUTAGES, refused=_REFUSED
        )

    async def run(
        self, doing: str, statement: Callable[[Any], Awaitable[T]], *, wait: float = 0.0
    ) -> T:
        """``statement(conn)`` on the loop's own connection (its listener's; connected on first
        use and once ended) if it is free within ``wait`` seconds, else on a pooled one; errors
        as :meth:`errors`. There, the listener's statements (``wait`` > 0) run in its task (its
        end cancels them), others in a task of their own (a caller cancelled meanwhile leaves
        it to finish, the connection clean). A statement cut off there (a timeout) or failed
        but not refused ends the connection (maybe left mid-statement); one the server cut off
        keeps it; one that finds it ended unseen (the loop was busy) runs once more on a new
        one (the statements are reads and deletes)."""
        loop = asyncio.get_running_loop()
        with self.errors(doing):
            using = self._using.setdefault(loop, asyncio.Lock())
            # Free: taken at once (no wait), so the statements started next go pooled.
            with anyio.move_on_after(wait if using.locked() else math.inf) as waited:
                await using.acquire()
            if waited.cancelled_caught:
                return await self._pooled(statement)
            if wait:
                return await self._owned(using, statement)
            task = loop.create_task(self._owned(using, statement))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
            return await asyncio.shield(task)

    async def _owned(self, using: asyncio.Lock, statement: Callable[[Any], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        try:  # ``using`` is held: released here
            while True:
                conn: Any = self._own.get(loop)
                fresh = conn is None or conn.is_closed()
                if fresh:
                    conn = self._own[loop] = await self.connect()
                try:
                    return await statement(conn)
                except BaseException as exc:
                    lost = isinstance(exc, OUTAGES) and not isinstance(exc, _CUT_OFF)
                    if lost or not isinstance(exc, asyncpg.PostgresError):
                        conn.terminate()
                    # Once only; not after a timeout, nor once end() ended the loop's
                    # connections (this one among them): a connection made now would outlive them.
                    timeout = isinstance(exc, asyncio.TimeoutError)
                    if fresh or not lost or timeout or self._using.get(loop) is not using:
                        raise
        finally:
            using.release()

    async def _pooled(self, statement: Callable[[Any], Awaitable[T]]) -> T:
        loop, options = asyncio.get_running_loop(), {**self._args, **self._options()}
        pool = self._pools.get(loop)
        if pool is None:  # min_size=0: made without a round trip, so without a race
            # reset: the pooled statements leave no session state to reset, so a
            # connection goes back without asyncpg's reset query (a round trip).
            pool = self._pools[loop] = await asyncpg.create_pool(
                min_size=0, max_size=self._pool_size, reset=_keep, **options
            )
        async with pool.acquire(timeout=options["command_timeout"]) as conn:
            await self._setup(conn)
            return await statement(conn)

    async def connect(self) -> Any:
        """A connection of its own (a lock session, or a listener's)."""
        with self.errors("connecting"):
            conn = await asyncpg.connect(**self._args, **self._options())
            try:
                await self._setup(conn)
            except BaseException:
                conn.terminate()
                raise
        return conn

    async def session(self) -> Any:
        """An idle lock session of this loop's, or a new one, out until :meth:`release`."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get(loop, [])
        while idle and idle[-1].is_closed():
            idle.pop()
        conn = idle.pop() if idle else await self.connect()
        self._out.setdefault(loop, set()).add(conn)
        return conn

    def release(self, conn: Any, *, keep: bool) -> None:
        """Keep a lock session that holds nothing (``keep``) for the next claim, up to
        :data:`IDLE_SESSIONS`; else end it, and its lock."""
        loop = asyncio.get_running_loop()
        self._out.get(loop, set()).discard(conn)
        idle = self._idle.setdefault(loop, [])
        if keep and not conn.is_closed() and len(idle) < IDLE_SESSIONS:
            idle.append(conn)
        else:
            conn.terminate()

    def end(self) -> None:
        """End the running loop's connections: its own, its pool, its lock sessions idle or
        out (a lease's renewal then finds it lost)."""
        loop = asyncio.get_running_loop()
        self._using.pop(loop, None)
        own = self._own.pop(loop, None)
        for conn in [*self._out.pop(loop, ()), *self._idle.pop(loop, ()), *([own] if own else [])]:
            conn.terminate()
        pool = self._pools.pop(loop, None)
        if pool is not None:
            pool.terminate()


async def _keep(conn: Any) -> None:
    """A pooled connection's reset: nothing (see :meth:`Connections.run`)."""


def connect_args(dsn: str, scrub: Scrubber) -> dict[str, Any]:
    """asyncpg.connect()'s arguments for ``dsn``: a URL as it is, a libpq string parsed.

    Raises:
        ValueError: a ``key=value`` string that cannot be parsed or has an unknown keyword.
    """
    if "://" in dsn or not dsn.strip():
        return {"dsn": dsn}
    args: dict[str, Any] = {}
    position = 0
    while position < len(dsn):
        match = _CONNINFO.match(dsn, position)
        if match is None:
            raise ValueError(
                f"PostgresBackend({scrub.shown!r}): cannot read the connection string at "
                f"character {position}; write key=value pairs separated by spaces, quoting "
                "values with spaces as key='a value'"
            )
        keyword, value = match.group(1).lower(), match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if keyword in _KEYWORDS:
            args[_RENAMED.get(keyword, keyword)] = int(value) if keyword == "port" else value
        elif keyword not in ("connect_timeout", "application_name"):  # the store sets these
            raise ValueError(
                f"PostgresBackend(...): the connection keyword {keyword!r} is not supported; "
                f"use {', '.join(sorted(_KEYWORDS))}, or a postgresql:// URL"
            )
        position = match.end()
    return args
