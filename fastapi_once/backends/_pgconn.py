"""The PostgreSQL store's connections per event loop (counted in ``docs/across.md``), its
DSN's arguments, and the driver's errors as store errors."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from ._base import PerLoop, holder_id, store_errors

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
    """One store's connections in each event loop, and how its driver errors read.

    Args:
        args: ``asyncpg.connect()``'s arguments but ``server_settings`` (see
            :func:`connect_args`; ``command_timeout`` bounds every statement).
        pool_size: the most pooled connections per loop.
        setup: run on every new connection's first use until it has made the tables.
        describe: the store's description, for errors.
        refusal: the error of a use outside an asyncio event loop.
    """

    def __init__(
        self,
        args: dict[str, Any],
        pool_size: int,
        setup: Callable[[Any], Awaitable[None]],
        describe: Callable[[], str],
        refusal: str,
    ) -> None:
        self._args, self._pool_size, self._setup, self._describe = args, pool_size, setup, describe
        self._loops = PerLoop(_Loop, refusal)  # until end()

    def errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """The driver's errors in the block as the store's (see ``_base.store_errors``)."""
        return store_errors(
            self._describe(), doing, DRIVER_ERRORS, outage=OUTAGES, refused=_REFUSED
        )

    async def run(
        self,
        doing: str,
        statement: Callable[[Any], Awaitable[T]],
        *,
        wait: float = 0.0,
        listener: bool = False,
    ) -> T:
        """``statement(conn)`` on the loop's own connection if it is free within ``wait``
        seconds, else on a pooled one; errors as :meth:`errors`. On its own connection, the
        ``listener``'s statements run in its task (its end cancels them; a task made as the
        loop shuts down would outlive it), others in a task of their own (a caller cancelled
        meanwhile leaves it to finish, the connection clean)."""
        here = self._loops.get()
        with self.errors(doing):
            # Free: taken at once (no wait), so the statements started next go pooled.
            with anyio.move_on_after(wait if here.using.locked() else math.inf) as waited:
                await here.using.acquire()
            if waited.cancelled_caught:
                return await self._pooled(statement)
            if listener:
                return await self._owned(here, statement)
            task = asyncio.get_running_loop().create_task(self._owned(here, statement))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
            return await asyncio.shield(task)

    async def _owned(self, here: _Loop, statement: Callable[[Any], Awaitable[T]]) -> T:
        """``statement`` on ``here.own`` (connected on first use and once ended), ``here.using``
        held: released here. A statement cut off there (a timeout) or failed but not refused
        ends the connection (maybe left mid-statement); one the server cut off keeps it; one
        that finds it ended unseen (the loop was busy) runs once more on a new one (the
        statements are reads and deletes)."""
        try:
            while True:
                fresh = here.own is None or here.own.is_closed()
                if fresh:
                    here.own = await self.connect()
                conn = here.own
                try:
                    return await statement(conn)
                except BaseException as exc:
                    lost = isinstance(exc, OUTAGES) and not isinstance(exc, _CUT_OFF)
                    if lost or not isinstance(exc, asyncpg.PostgresError):
                        conn.terminate()
                    # Once only; not after a timeout, nor once end() ended the loop's
                    # connections (this one among them): the loop's listener has ended.
                    if fresh or not lost or isinstance(exc, asyncio.TimeoutError) or here.ended:
                        raise
        finally:
            here.using.release()
            if here.ended and here.own is not None:  # made while end() ran: ends as the others
                here.own.terminate()

    async def _pooled(self, statement: Callable[[Any], Awaitable[T]]) -> T:
        here = self._loops.get()
        if here.pool is None:  # min_size=0: made without a round trip, so without a race
            # reset: the pooled statements leave no session state to reset, so a
            # connection goes back without asyncpg's reset query (a round trip).
            here.pool = await asyncpg.create_pool(
                min_size=0, max_size=self._pool_size, reset=_keep, **self._connect_args()
            )
        async with here.pool.acquire(timeout=self._args["command_timeout"]) as conn:
            await self._setup(conn)
            return await statement(conn)

    async def connect(self) -> Any:
        """A connection of its own (a lock session, or a listener's)."""
        with self.errors("connecting"):
            conn = await asyncpg.connect(**self._connect_args())
            try:
                await self._setup(conn)
            except BaseException:
                conn.terminate()
                raise
        return conn

    async def session(self) -> Any:
        """An idle lock session of this loop's, or a new one, out until :meth:`release`."""
        here = self._loops.get()
        while here.idle and here.idle[-1].is_closed():
            here.idle.pop()
        conn = here.idle.pop() if here.idle else await self.connect()
        here.out.add(conn)
        return conn

    def release(self, conn: Any, *, keep: bool) -> None:
        """Keep a lock session that holds nothing (``keep``) for the next claim, up to
        :data:`IDLE_SESSIONS`, unless it has ended (as :meth:`end` ends those lent); else end
        it, and its lock."""
        here = self._loops.get()
        if keep and not conn.is_closed() and len(here.idle) < IDLE_SESSIONS:
            here.idle.append(conn)
        else:
            conn.terminate()
        here.out.discard(conn)

    def end(self) -> None:
        """End the running loop's connections: its own, its pool, its lock sessions idle or
        out (a lease's renewal then finds it lost)."""
        here = self._loops.pop()
        if here is not None:
            here.ended = True
            for conn in [*here.out, *here.idle, *([here.own] if here.own else [])]:
                conn.terminate()
            if here.pool is not None:
                here.pool.terminate()

    def _connect_args(self) -> dict[str, Any]:
        """The arguments of a connection: the process's name for followers (after a fork, the
        child's)."""
        name = (APPLICATION + holder_id())[:63]
        return {**self._args, "server_settings": {"application_name": name}}


@dataclass
class _Loop:
    """One event loop's connections; only that loop's thread touches them."""

    own: Any = None  # its own connection: its listener's, lent to statements while free
    using: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by the statement on own
    pool: Any = None  # for the statements that overlap one on own
    out: set[Any] = field(default_factory=set)  # lock sessions lent to claims
    idle: list[Any] = field(default_factory=list)  # lock sessions kept for the next claims
    ended: bool = False  # end() ended them: a connection made meanwhile ends after its statement


async def _keep(conn: Any) -> None:
    """A pooled connection's reset: nothing (see ``Connections._pooled``)."""


def connect_args(dsn: str, shown: str) -> dict[str, Any]:
    """asyncpg.connect()'s arguments for ``dsn``: a URL as it is, a libpq string parsed
    (``shown``: the DSN as errors show it, its password masked).

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
                f"PostgresBackend({shown!r}): cannot read the connection string at "
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
