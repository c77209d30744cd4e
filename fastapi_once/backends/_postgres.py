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
from urllib.parse import urlsplit

import anyio

from ._base import (
    Backend,
    BackendError,
    WaitTimeoutError,
    encode_result,
    holder_id,
    mask_url,
    seconds,
)

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PostgresBackend needs the asyncpg package: pip install 'fastapi-once[postgres]'"
    ) from exc


class _Connection(Protocol):
    """The part of ``asyncpg.Connection`` this module uses (asyncpg ships no type hints)."""

    async def execute(self, query: str, *args: object) -> str: ...
    async def fetchval(self, query: str, *args: object) -> Any: ...
    async def fetchrow(self, query: str, *args: object) -> Any: ...
    async def close(self, *, timeout: float | None = None) -> None: ...  # noqa: ASYNC109
    def terminate(self) -> None: ...
    def is_closed(self) -> bool: ...


# What the driver raises when the server is unreachable, the connection breaks, or a query fails
# (asyncio.TimeoutError is not TimeoutError before Python 3.11).
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_APPLICATION = "fastapi_once "  # application_name prefix: tells followers who holds a lock


class PostgresBackend(Backend):
    """Run a once's work once across every process (and host) that uses one PostgreSQL database.

    Each ``run_once`` opens a dedicated connection. It reads the marker table first (the fast
    path, no lock); otherwise it tries the advisory lock derived from the once's name, re-reads
    the marker, and as leader runs the work, writes the marker row (with the JSON result), and
    releases the lock. Followers block on the same lock in shared mode, so all of them wake as
    soon as the leader releases it, whether it finished, failed or died (PostgreSQL ends a dead
    client's session and its locks with it); if no marker was written, they race to lead.

    ``lock="session"`` (the default) holds ``pg_advisory_lock`` on the connection's session for
    the length of the work. ``lock="transaction"`` instead holds ``pg_advisory_xact_lock`` in a
    transaction that stays open for the length of the work and commits the marker with the lock's
    release; use it behind PgBouncer in transaction pooling mode, which breaks session locks (a
    session lock would stay on a server connection that other clients then use).

    The marker table (default ``fastapi_once``) is created on first use if missing::

        CREATE TABLE fastapi_once (
            name text PRIMARY KEY, result text NOT NULL, expires_at timestamptz,
            done_at timestamptz NOT NULL DEFAULT now(), done_by text NOT NULL)

    Limits: asyncio only (asyncpg). The leader's connection is idle while the work runs, so
    ``idle_session_timeout`` (session mode) or ``idle_in_transaction_session_timeout``
    (transaction mode) must exceed the work's duration. A leader cut off from the server by the
    network keeps its lock until the server notices (TCP keepalive); if its session ends first,
    its marker write fails and nothing is recorded.

    Args:
        dsn: a libpq connection URL or string (``postgresql://user:password@host/db``); its
            password never appears in errors, logs or :meth:`describe`.
        table: the marker table, optionally schema-qualified (``schema.table``).
        lock: ``"session"`` or ``"transaction"`` (for PgBouncer transaction pooling).
        wait_timeout: the longest a follower waits for the leader, in seconds; None waits as
            long as the leader runs.
        ttl: the default life of a marker in seconds (``run_once(ttl=)`` overrides it); None
            keeps markers until :meth:`reset`.
        connect_timeout: seconds allowed to connect.

    Raises:
        ValueError: ``table`` is not an identifier, ``lock`` is unknown, or a timeout is not a
            positive number.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "fastapi_once",
        lock: Literal["session", "transaction"] = "session",
        wait_timeout: float | None = None,
        ttl: float | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        parts = table.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            raise ValueError(
                f"PostgresBackend(table={table!r}): give a table name, optionally "
                "schema-qualified, of letters, digits and underscores (e.g. 'fastapi_once')"
            )
        if lock not in ("session", "transaction"):
            raise ValueError(
                f"PostgresBackend(lock={lock!r}): lock is 'session' or 'transaction' (for "
                "PgBouncer transaction pooling)"
            )
        self._dsn = dsn
        self._password = _password(dsn)
        self._shown = mask_url(dsn)
        self.table = table
        self.lock = lock
        self.wait_timeout = seconds("wait_timeout", wait_timeout)
        self.ttl = seconds("ttl", ttl)
        self.connect_timeout: float = seconds("connect_timeout", connect_timeout)
        self._quoted = ".".join(f'"{p}"' for p in parts)
        self._table_ready = False

    def describe(self) -> str:
        """Return ``PostgresBackend(<dsn with the password masked>, table=..., lock=...)``."""
        return f"PostgresBackend({self._shown}, table={self.table}, lock={self.lock})"

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
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        """Return ``name``'s recorded result, running ``work`` first if no process has.

        Args:
            name: the once's name, its identity across processes.
            work: makes the result (runs in this process only if it becomes the leader).
            ttl: seconds the marker stays valid; default the backend's ``ttl``.

        Raises:
            TypeError: the result is not JSON-serialisable (nothing is recorded).
            WaitTimeoutError: a follower waited longer than ``wait_timeout``.
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
                with self._driver_errors("waiting for the lock"):
                    found = await self._acquire(conn, name, key, started)
            if found is not None:
                return json.loads(found)
            value = await work()
            text = encode_result(name, value, self.describe())
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

    async def _acquire(self, conn: _Connection, name: str, key: int, started: float) -> str | None:
        """Return the recorded result, or None once ``conn`` holds the exclusive lock.

        In transaction mode the lock is held by a transaction left open for the leader.
        """
        while True:
            if self.lock == "session":
                leading = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
                if not leading:
                    await conn.execute("BEGIN")
            else:
                await conn.execute("BEGIN")
                leading = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key)
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
            # Followers wait in shared mode, so that all of them wake together when the leader
            # releases the lock; if it left no marker (it failed or died), they race to lead.
            await self._wait_shared(conn, name, key, started)
            found = await conn.fetchval(self._select, name)
            await conn.execute("COMMIT")
            if found is not None:
                return found

    async def _wait_shared(self, conn: _Connection, name: str, key: int, started: float) -> None:
        """In the open transaction, wait for the lock in shared mode, at most wait_timeout."""
        if self.wait_timeout is None:
            limit = 0  # no limit
        else:
            left = self.wait_timeout - (time.monotonic() - started)
            limit = max(1, int(left * 1000))
        await conn.execute(f"SET LOCAL lock_timeout = {limit}")
        try:
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", key)
        except asyncpg.exceptions.LockNotAvailableError:
            await conn.execute("ROLLBACK")
            holder = await self._holder(conn, key)
            waited = time.monotonic() - started
            raise WaitTimeoutError(name, self.describe(), waited, holder) from None

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
                self._dsn,
                timeout=self.connect_timeout,
                # Transaction pooling cannot keep prepared statements between transactions.
                statement_cache_size=0 if self.lock == "transaction" else 100,
                server_settings={"application_name": (_APPLICATION + holder_id())[:63]},
            )
        return cast(_Connection, conn)

    async def _ensure_table(self, conn: _Connection) -> None:
        if self._table_ready:
            return
        if await conn.fetchval("SELECT to_regclass($1)", self._quoted) is None:
            # One multi-statement query is one transaction: the transaction lock keeps
            # concurrent first uses from racing on CREATE TABLE.
            await conn.execute(
                f"SELECT pg_advisory_xact_lock({_lock_key(self.table, '')}); "
                f"CREATE TABLE IF NOT EXISTS {self._quoted} ("
                "name text PRIMARY KEY, result text NOT NULL, expires_at timestamptz, "
                "done_at timestamptz NOT NULL DEFAULT now(), done_by text NOT NULL)"
            )
        self._table_ready = True

    @property
    def _select(self) -> str:
        return (
            f"SELECT result FROM {self._quoted} "
            "WHERE name = $1 AND (expires_at IS NULL OR expires_at > now())"
        )

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
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            OSError,
            asyncio.TimeoutError,
        ) as exc:
            if isinstance(exc, WaitTimeoutError):
                raise
            detail = f"{type(exc).__name__}: {exc}"
            if self._password:
                detail = detail.replace(self._password, "***")
            raise BackendError(f"{self.describe()}: failed {doing}: {mask_url(detail)}") from exc


async def _close(conn: _Connection) -> None:
    if conn.is_closed():
        return
    with anyio.CancelScope(shield=True):
        try:
            await conn.close(timeout=5)
        except Exception:
            conn.terminate()


def _lock_key(table: str, name: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of ``name`` in ``table``."""
    digest = hashlib.sha256(f"fastapi_once\0{table}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _password(dsn: str) -> str | None:
    """The password in ``dsn``, to scrub from the driver's messages."""
    match = re.search(r"password\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)", dsn, re.IGNORECASE)
    if match:
        return match.group(1).strip("'")
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None
