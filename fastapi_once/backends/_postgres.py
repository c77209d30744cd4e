"""PostgresBackend: an advisory lock per once and a marker table, through asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, Protocol, cast

import anyio

from .._errors import BackendError, WaitTimeoutError
from ._base import (
    DEFAULT_WAIT_TIMEOUT,
    Backend,
    Scrubber,
    backoff,
    holder_id,
    run_guarded,
    seconds,
    time_left,
)
from ._codec import encode_json

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgresBackend needs the asyncpg package: pip install 'fastapi-once[postgres]'"
    ) from exc


class _Connection(Protocol):
    """The part of ``asyncpg.Connection`` this module uses (asyncpg ships no type hints)."""

    async def execute(self, query: str, *args: object) -> str: ...
    async def fetchval(self, query: str, *args: object, timeout: float | None = None) -> Any: ...  # noqa: ASYNC109
    async def fetchrow(self, query: str, *args: object) -> Any: ...
    async def close(self, *, timeout: float | None = None) -> None: ...  # noqa: ASYNC109
    def terminate(self) -> None: ...
    def is_closed(self) -> bool: ...


# What the driver raises when the server is unreachable, the connection breaks, or a query fails
# (asyncio.TimeoutError is not TimeoutError before Python 3.11).
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)

# What a server restart or a broken network looks like: worth reconnecting and waiting on.
_OUTAGE_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    # The server ended the session while the connection was idle: the next query finds the
    # connection in a state it cannot leave.
    asyncpg.exceptions.InternalClientError,
)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,56}")  # room for the sequence's "_fence"
_APPLICATION = "fastapi_once "  # application_name prefix: tells followers who holds a lock

# libpq connection keywords and the asyncpg.connect() arguments they become.
_KEYWORDS = {
    "host": "host",
    "hostaddr": "host",
    "port": "port",
    "user": "user",
    "password": "password",
    "passfile": "passfile",
    "dbname": "database",
    "sslmode": "ssl",
    "service": "service",
    "servicefile": "servicefile",
    "target_session_attrs": "target_session_attrs",
    "krbsrvname": "krbsrvname",
    "gsslib": "gsslib",
}
_CONNINFO = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)\s*")


class PostgresBackend(Backend):
    """Run a once's work once across every process (and host) that uses one PostgreSQL database.

    Each ``run_once`` opens a dedicated connection. It reads the marker table first (the fast
    path, no lock); otherwise it tries the advisory lock derived from the once's name, re-reads
    the marker, and as leader draws a fencing token from the ``<table>_fence`` sequence, runs the
    work, writes the marker row (with the result), and releases the lock. Followers check every
    ``poll_interval`` seconds, in one statement, for the marker and for whether the lock is still
    held, so they see the leader's end within that interval whether it finished, failed or died
    (PostgreSQL ends a dead client's session and its locks with it); if no marker was written,
    they race to lead.

    While the work runs, the leader checks its lock's session every ``check_interval`` seconds:
    if the session has ended (a server restart, a terminated backend, a broken network), the lock
    is gone, so the work is cancelled and :class:`~fastapi_once.backends.LeaseLostError` raised,
    with nothing recorded. A follower whose connection breaks (e.g. the server restarts)
    reconnects with backoff and keeps waiting, up to ``wait_timeout``; an unreachable server at
    the first contact fails at once with :class:`~fastapi_once.backends.BackendError`.

    ``lock="session"`` (the default) holds ``pg_advisory_lock`` on the connection's session for
    the length of the work. ``lock="transaction"`` instead holds ``pg_advisory_xact_lock`` in a
    transaction that stays open for the length of the work and commits the marker with the lock's
    release; use it behind PgBouncer in transaction pooling mode, which breaks session locks (a
    session lock would stay on a server connection that other clients then use).

    The marker table (default ``fastapi_once``) and its sequence are created on first use if
    missing::

        CREATE TABLE fastapi_once (
            name text PRIMARY KEY, result text NOT NULL, expires_at timestamptz,
            done_at timestamptz NOT NULL DEFAULT now(), done_by text NOT NULL);
        CREATE SEQUENCE fastapi_once_fence;

    Limits: asyncio only (asyncpg). ``idle_session_timeout`` (session mode) or
    ``idle_in_transaction_session_timeout`` (transaction mode) must exceed ``check_interval``.

    Args:
        dsn: a connection URL (``postgresql://user:password@host:5432/db``, also
            ``postgres://``) or a libpq ``key=value`` string (``host=db user=app password=...
            dbname=app``, with the keywords host, hostaddr, port, user, password, passfile,
            dbname, sslmode, service, servicefile, target_session_attrs, krbsrvname, gsslib);
            its password never appears in errors, logs or :meth:`describe`.
        table: the marker table, optionally schema-qualified (``schema.table``).
        lock: ``"session"`` or ``"transaction"`` (for PgBouncer transaction pooling).
        wait_timeout: the longest a follower waits for the leader, in seconds (default
            300 s), outages included; None waits as long as the leader runs.
        ttl: the default life of a marker in seconds (``run_once(ttl=)`` overrides it); None
            keeps markers until :meth:`reset`.
        connect_timeout: seconds allowed to connect.
        check_interval: how often the leader checks that its lock's session is alive, in
            seconds: how long a leader whose lock is gone may go on (default 1).
        poll_interval: how often a follower checks for the leader's marker, and whether the
            leader still holds the lock, in seconds (default 0.025).

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
        wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        ttl: float | None = None,
        connect_timeout: float = 10.0,
        check_interval: float = 1.0,
        poll_interval: float = 0.025,
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
        self._scrub = Scrubber(dsn)
        self._connect_args = _connect_args(dsn, self._scrub)
        self.table = table
        self.lock = lock
        self.wait_timeout = seconds("wait_timeout", wait_timeout)
        self.ttl = seconds("ttl", ttl)
        self.connect_timeout: float = seconds("connect_timeout", connect_timeout)
        self.check_interval: float = seconds("check_interval", check_interval)
        self.poll_interval: float = seconds("poll_interval", poll_interval)
        self._quoted = ".".join(f'"{p}"' for p in parts)
        self._sequence = ".".join(f'"{p}"' for p in [*parts[:-1], parts[-1] + "_fence"])
        self._table_ready = False

    def describe(self) -> str:
        """Return ``PostgresBackend(<dsn with the password masked>, table=..., lock=...)``."""
        return f"PostgresBackend({self._scrub.shown}, table={self.table}, lock={self.lock})"

    async def reset(self, name: str) -> None:
        """Delete ``name``'s marker row, so that the next :meth:`run_once` runs the work.

        Args:
            name: the once's name (``once(...).name``).

        Raises:
            BackendError: the database could not be reached or refused the query.
        """
        conn = await self._connect()
        try:
            with self._driver_errors("deleting the marker"):
                await self._ensure_table(conn)
                await conn.execute(f"DELETE FROM {self._quoted} WHERE name = $1", name)
        finally:
            await _close(conn)

    async def run_once(
        self,
        name: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
    ) -> Any:
        """Return ``name``'s recorded result, running ``work`` first if no process has.

        While ``work`` runs as leader, :func:`~fastapi_once.backends.fencing_token` returns a
        number drawn from the ``<table>_fence`` sequence for this leader.

        Args:
            name: the once's name, its identity across processes.
            work: makes the result (runs in this process only if it becomes the leader).
            ttl: seconds the marker stays valid; default the backend's ``ttl``.

        Raises:
            TypeError: the result is not JSON-serialisable (nothing is recorded).
            WaitTimeoutError: a follower waited longer than ``wait_timeout``.
            LeaseLostError: the session holding the lock ended while ``work`` ran.
            BackendError: the database could not be reached or refused a query.
            Exception: what ``work`` raised, in the process that ran it.
        """
        ttl = self.ttl if ttl is None else seconds("ttl", ttl)
        started = time.monotonic()
        key = _lock_key(self.table, name)
        conn = await self._connect()
        try:
            with self._driver_errors("reading the marker"):
                await self._ensure_table(conn)
                found = await conn.fetchval(self._select, name)
            if found is None:
                found, conn = await self._acquire(conn, name, key, started)
            if found is not None:
                return json.loads(found)
            with self._driver_errors("drawing a fencing token"):
                fence = int(await conn.fetchval(f"SELECT nextval('{self._sequence}')"))
            value = await self._lead(conn, name, fence, work)
            text = encode_json(name, value, self.describe())
            with self._driver_errors("recording the result"):
                # Written on the connection that holds the lock: if its session has died (and
                # the lock with it), the write fails and nothing is recorded.
                await conn.execute(self._upsert, name, text, ttl, holder_id())
                if self.lock == "session":
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
                else:
                    # The marker becomes visible and the lock is released in one commit.
                    await conn.execute("COMMIT")
            return json.loads(text)
        except BaseException:
            # Ending the session rolls back and releases whatever it holds, even when the
            # connection is mid-query (a cancelled lock wait) or broken.
            conn.terminate()
            raise
        finally:
            await _close(conn)

    async def _lead(
        self, conn: _Connection, name: str, fence: int, work: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run ``work`` under the lock, cancelling it if the lock's session ends."""

        async def until_lost() -> str:
            while True:
                await anyio.sleep(self.check_interval)
                # Shielded and bounded, so that the query is never cut off half-way: the
                # connection goes back to the leader in a usable state.
                with anyio.CancelScope(shield=True):
                    try:
                        await conn.fetchval("SELECT 1", timeout=self.check_interval)
                    except _DRIVER_ERRORS as exc:
                        return self._scrub(f"its session ended: {type(exc).__name__}: {exc}")

        return await run_guarded(name, self.describe(), fence, work, until_lost)

    async def _acquire(
        self, conn: _Connection, name: str, key: int, started: float
    ) -> tuple[str | None, _Connection]:
        """Return (the recorded result, or None as leader holding the lock; the connection).

        A connection lost while waiting (a server restart) is replaced, with backoff, as long
        as ``wait_timeout`` allows; the returned connection is the one holding the lock.
        """
        failures = 0
        try:
            while True:
                try:
                    with self._driver_errors("waiting for the lock"):
                        return await self._try_acquire(conn, name, key, started), conn
                except BackendError as exc:
                    cause = exc.__cause__
                    outage = isinstance(cause, _OUTAGE_ERRORS) or conn.is_closed()
                    if not outage or isinstance(cause, WaitTimeoutError):
                        raise
                    conn.terminate()
                    conn, failures = await self._reconnect(exc, started, failures)
        except BaseException:
            conn.terminate()  # it may be a replacement, which the caller does not know of
            raise

    async def _reconnect(
        self, exc: BackendError, started: float, failures: int
    ) -> tuple[_Connection, int]:
        """Connect again, with backoff, while ``wait_timeout`` allows; else raise ``exc``."""
        while True:
            left = time_left(self.wait_timeout, time.monotonic() - started)
            if left <= 0:
                raise exc
            await anyio.sleep(min(backoff(failures), left))
            failures += 1
            try:
                return await self._connect(), failures
            except BackendError as again:
                exc = again

    async def _try_acquire(
        self, conn: _Connection, name: str, key: int, started: float
    ) -> str | None:
        """Return the recorded result, or None once ``conn`` holds the exclusive lock.

        In transaction mode the lock is held by a transaction left open for the leader.
        """
        while True:
            if self.lock == "session":
                leading = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
            else:
                await conn.execute("BEGIN")
                leading = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key)
                if not leading:
                    await conn.execute("ROLLBACK")
            if leading:
                # A statement after taking the lock sees what the last holder committed.
                found: str | None = await conn.fetchval(self._select, name)
                if found is None:
                    return None
                if self.lock == "session":
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
                else:
                    await conn.execute("COMMIT")
                return found
            found = await self._follow(conn, name, key, started)
            if found is not None:
                return found
            # No marker and no leader: it failed or died; race the other followers to lead.

    async def _follow(self, conn: _Connection, name: str, key: int, started: float) -> str | None:
        """Poll until the leader's marker appears (return it) or no one holds the lock (None).

        One indexed read per ``poll_interval``, outside any transaction. Followers that poll
        are spread in time, so a leader's end does not wake them all at the same instant
        (waiting on the lock did: with many processes on few cores, the last woke late).
        """
        while True:
            row = await conn.fetchrow(self._peek, name, key)
            if row["result"] is not None:
                return str(row["result"])
            if row["free"]:
                return None
            waited = time.monotonic() - started
            if self.wait_timeout is not None and waited >= self.wait_timeout:
                holder = await self._holder(conn, key)
                raise WaitTimeoutError(name, self.describe(), waited, holder)
            await anyio.sleep(self.poll_interval)

    async def _holder(self, conn: _Connection, key: int) -> str | None:
        """Say who holds the advisory lock ``key``: the leader's pid and host, if it can tell."""
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        try:
            row = await conn.fetchrow(
                "SELECT a.pid, a.application_name FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted "
                "AND l.objsubid = 1 "
                "AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid",
                unsigned >> 32,
                unsigned & 0xFFFF_FFFF,
            )
        except _DRIVER_ERRORS:
            return None
        if row is None:
            return None
        app = str(row["application_name"] or "")
        if app.startswith(_APPLICATION):
            return app[len(_APPLICATION) :]
        return f"PostgreSQL backend pid {row['pid']}"

    async def _connect(self) -> _Connection:
        with self._driver_errors("connecting"):
            conn = await asyncpg.connect(
                **self._connect_args,
                timeout=self.connect_timeout,
                # Transaction pooling cannot keep prepared statements between transactions.
                statement_cache_size=0 if self.lock == "transaction" else 100,
                server_settings={"application_name": (_APPLICATION + holder_id())[:63]},
            )
        return cast(_Connection, conn)

    async def _ensure_table(self, conn: _Connection) -> None:
        if self._table_ready:
            return
        exists = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            self._quoted,
            self._sequence,
        )
        if not exists:
            # One multi-statement query is one transaction: the transaction lock keeps
            # concurrent first uses from racing on CREATE.
            await conn.execute(
                f"SELECT pg_advisory_xact_lock({_lock_key(self.table, '')}); "
                f"CREATE TABLE IF NOT EXISTS {self._quoted} ("
                "name text PRIMARY KEY, result text NOT NULL, expires_at timestamptz, "
                "done_at timestamptz NOT NULL DEFAULT now(), done_by text NOT NULL); "
                f"CREATE SEQUENCE IF NOT EXISTS {self._sequence}"
            )
        self._table_ready = True

    @property
    def _select(self) -> str:
        return (
            f"SELECT result FROM {self._quoted} "
            "WHERE name = $1 AND (expires_at IS NULL OR expires_at > now())"
        )

    @property
    def _peek(self) -> str:
        # The shared transaction lock is taken and dropped within the statement: it is free
        # only when no leader holds the exclusive one.
        return f"SELECT ({self._select}) AS result, pg_try_advisory_xact_lock_shared($2) AS free"

    @property
    def _upsert(self) -> str:
        return (
            f"INSERT INTO {self._quoted} (name, result, expires_at, done_by) "
            "VALUES ($1, $2, now() + make_interval(secs => $3::float8), $4) "
            "ON CONFLICT (name) DO UPDATE SET result = EXCLUDED.result, "
            "expires_at = EXCLUDED.expires_at, done_at = now(), done_by = EXCLUDED.done_by"
        )

    @contextlib.contextmanager
    def _driver_errors(self, doing: str) -> Iterator[None]:
        """Turn the driver's errors into BackendError, with any password scrubbed out."""
        try:
            yield
        except _DRIVER_ERRORS as exc:
            if isinstance(exc, WaitTimeoutError):
                raise
            detail = self._scrub(f"{type(exc).__name__}: {exc}")
            raise BackendError(f"{self.describe()}: failed {doing}: {detail}") from exc


async def _close(conn: _Connection) -> None:
    # Outside a transaction, closing the socket is a clean end for the server; waiting for it
    # to end the session (a graceful close) would delay every caller, and 16 processes woken
    # together by a round trip and a server process exit each.
    conn.terminate()


def _lock_key(table: str, name: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of ``name`` in ``table``."""
    digest = hashlib.sha256(f"fastapi_once\0{table}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _connect_args(dsn: str, scrub: Scrubber) -> dict[str, Any]:
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
        if keyword == "connect_timeout" or keyword == "application_name":
            pass  # the backend sets these itself
        elif keyword not in _KEYWORDS:
            raise ValueError(
                f"PostgresBackend(...): the connection keyword {keyword!r} is not supported; "
                f"use {', '.join(sorted(_KEYWORDS))}, or a postgresql:// URL"
            )
        else:
            args[_KEYWORDS[keyword]] = int(value) if keyword == "port" else value
        position = match.end()
    return args
