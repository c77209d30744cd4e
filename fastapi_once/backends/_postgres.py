"""PostgresBackend: an advisory lock per once and a marker table, through asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, Protocol, TypeVar, cast

import anyio

from .._errors import BackendError, LeaseLostError, OnceCoolingDownError, WaitTimeoutError
from ._base import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_WAIT_TIMEOUT,
    Backend,
    Scrubber,
    backoff,
    check_size,
    forget_reset,
    holder_id,
    max_bytes,
    reset_message,
    run_guarded,
    seconds,
    time_left,
)
from ._codec import encode_json
from ._wakeups import Listeners, Wakeups

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
    async def add_listener(self, channel: str, callback: Callable[..., object]) -> None: ...
    async def remove_listener(self, channel: str, callback: Callable[..., object]) -> None: ...
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
_IDLE = 8  # idle connections kept per event loop for keyed calls, and keyed reads at once
_T = TypeVar("_T")

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

    A keyed once (``once(fn, key=..., ttl=..., across=backend)``) keeps one row per key in
    ``<table>_keyed`` (created on first keyed use), named by the once's name and the key's
    40-digit digest (never the key's text), under an advisory lock of its own. A row holds the
    result until ``value_until`` (``ttl``), or a failure's cooldown until ``cool_until``;
    each leader's write deletes up to 100 expired rows, so the table holds about one ttl
    window of keys. The leader's ``NOTIFY`` on the channel ``fastapi_once_<digest>_keyed``
    (one per table), naming the record by a digest, announces its end. Followers hold no
    connection while they wait: one connection per process and event loop ``LISTEN``s on it
    (and on keyed resets) and wakes them; they check again every ``recheck_interval`` seconds
    (a leader that died announces nothing; its lock ends with its session). Keyed reads
    borrow one of up to 8 connections per event loop for the query only (at most 8 at once);
    a leader holds its own connection, for its lock, while it works. An unkeyed call opens
    its own::

        CREATE TABLE fastapi_once_keyed (
            name text, key text, result text, made_at timestamptz, value_until timestamptz,
            cool_until timestamptz, expires_at timestamptz NOT NULL, done_by text NOT NULL,
            PRIMARY KEY (name, key));

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
        max_value_bytes: the largest result recorded, in bytes of JSON (default 1 MiB); a
            leader whose result is larger raises ValueError and records nothing. None: no
            limit.
        recheck_interval: how often a follower of a keyed once checks without being notified,
            in seconds (default 1): how late it learns of a leader that died.

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
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        recheck_interval: float = 1.0,
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
        self.max_value_bytes = max_bytes(max_value_bytes)
        self.recheck_interval: float = seconds("recheck_interval", recheck_interval)
        self._quoted = ".".join(f'"{p}"' for p in parts)
        self._sequence = ".".join(f'"{p}"' for p in [*parts[:-1], parts[-1] + "_fence"])
        self._keyed = ".".join(f'"{p}"' for p in [*parts[:-1], parts[-1] + "_keyed"])
        self._table_ready = False
        self._keyed_ready = False
        # Per event loop, the task that listens for keyed leaders' ends and other processes'
        # keyed resets, and the followers it wakes; it ends with its loop (or aclose).
        self._listeners = Listeners(self._forget_resets)
        # Per event loop, connections a keyed call left holding nothing, for the next keyed
        # call (a connection per miss is slow: a server process and an authentication each).
        # The loop's listener ends them when it ends.
        self._idle: dict[asyncio.AbstractEventLoop, list[_Connection]] = {}
        # Per event loop: the gate that bounds the keyed reads in flight (each on a connection
        # borrowed for the query only) to _IDLE. Only the loop's thread touches its entry; it
        # leaves with the listener.
        self._gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._me = secrets.token_hex(8)  # tells this backend's own reset messages apart
        digest = hashlib.sha256(self.table.encode()).hexdigest()[:24]
        self._resets = f"fastapi_once_{digest}_resets"  # the channel of keyed resets
        # The channel of every keyed leader's end; the payload names the record.
        self._ends = f"fastapi_once_{digest}_keyed"

    def describe(self) -> str:
        """Return ``PostgresBackend(<dsn with the password masked>, table=..., lock=...)``."""
        return f"PostgresBackend({self._scrub.shown}, table={self.table}, lock={self.lock})"

    async def aclose(self) -> None:
        """Stop the running event loop's listener for keyed resets (it restarts on next use;
        keyed followers waiting meanwhile go on waiting, on the loop's next listener)."""
        await self._listeners.stop()
        self._close_idle(asyncio.get_running_loop())

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
            check_size(name, text, self.max_value_bytes, self.describe())
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
        return await self._riding_outages(
            conn, started, lambda c: self._try_acquire(c, name, key, started)
        )

    async def _riding_outages(
        self,
        conn: _Connection,
        started: float,
        attempt: Callable[[_Connection], Awaitable[str | None]],
    ) -> tuple[str | None, _Connection]:
        """Return ``attempt(conn)``'s outcome and the connection it ended on.

        A connection lost meanwhile (a server restart) is replaced, with backoff, as long as
        ``wait_timeout`` allows, and ``attempt`` runs again on the new one.
        """
        failures = 0
        try:
            while True:
                try:
                    with self._driver_errors("waiting for the lock"):
                        return await attempt(conn), conn
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

    # --- keyed records -----------------------------------------------------------------------

    async def run_keyed(
        self,
        name: str,
        key: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        cooldown: float | None = None,
        refresh: float | None = None,
    ) -> Any:
        """Return ``name``'s recorded result for ``key``, running ``work`` first if due.

        One query serves a recorded value (or says a failure cools down). Otherwise the key's
        advisory lock is tried; as leader, ``work`` runs, its result is recorded for ``ttl``
        seconds and the followers, woken by this loop's listener, are notified.

        Args: as :meth:`Backend.run_keyed`.

        Raises:
            OnceCoolingDownError: another process's run failed within ``cooldown``.
            ValueError: the result is larger than ``max_value_bytes`` (nothing is recorded).
            TypeError: the result is not JSON-serialisable (nothing is recorded).
            WaitTimeoutError: a follower waited longer than ``wait_timeout``.
            LeaseLostError: the session holding the lock ended while ``work`` ran.
            BackendError: the database could not be reached or refused a query.
            Exception: what ``work`` raised, in the process that ran it.
        """
        ttl = seconds("ttl", ttl)
        shown = f"{name}[#{key[:8]}]"  # as logs name the key
        started = time.monotonic()
        wakeups = self._listeners.start()
        record = _KeyedRecord(self.table, name, key, shown, refresh)
        found, conn = await self._keyed_acquire(record, wakeups, started)
        if conn is None:
            return json.loads(cast(str, found))
        clean = False  # whether conn holds nothing (no lock or transaction) at the end
        try:
            with self._driver_errors("drawing a fencing token"):
                fence = int(await conn.fetchval(f"SELECT nextval('{self._sequence}')"))
            try:
                value = await self._lead(conn, shown, fence, work)
                text = encode_json(shown, value, self.describe())
                check_size(shown, text, self.max_value_bytes, self.describe())
            except LeaseLostError:
                raise
            except Exception:
                await self._keyed_failed(conn, record, cooldown)
                raise
            except BaseException:
                # Cancelled (the connection is idle: the liveness check is shielded): free the
                # key and wake the waiters now, rather than at their recheck_interval; nothing
                # failed, so no cooldown.
                await self._keyed_failed(conn, record, None)
                raise
            with self._driver_errors("recording the result"):
                # On the connection that holds the lock: if its session has died, nothing is
                # recorded. NOTIFY is delivered when its transaction commits.
                await conn.execute(
                    self._keyed_record, name, key, text, ttl, holder_id(), record.channel
                )
                await self._unlock(conn, record.lock)
            clean = True
            return json.loads(text)
        except BaseException:
            conn.terminate()  # ends the session: rolls back and releases what it holds
            raise
        finally:
            self._give_back(conn, clean)

    async def _keyed_acquire(
        self, record: _KeyedRecord, wakeups: Wakeups, started: float
    ) -> tuple[str | None, _Connection | None]:
        """Return (the result to serve, None), or (None, a connection holding the key's lock).

        Each read borrows a connection for the query only. While another process leads, a
        follower registers with this loop's listener (see :meth:`_listen`), reads again once
        the listener is subscribed (the leader may have ended before), and waits to be woken
        or for ``recheck_interval``, holding no connection. A server gone away while waiting
        is ridden out with backoff until ``wait_timeout``; unreachable at the first contact,
        it fails at once.
        """
        failures = 0
        reached = False
        with contextlib.ExitStack() as stack:
            woken: asyncio.Event | None = None
            while True:
                if wakeups.ended:  # aclose() stopped the listener: wait on the loop's next one
                    stack.close()
                    woken, wakeups = None, self._listeners.start()
                if woken is not None:
                    woken.clear()  # before the read: a wake-up after it is kept
                try:
                    row = await self._borrowed(
                        "reading the record",
                        lambda c: c.fetchrow(self._keyed_peek, *record.read, record.lock),
                    )
                    reached = True
                    # A result due for refresh is served while another process refreshes it.
                    found = record.served(row, not row["free"])
                    if found is not None:
                        return found, None
                    if row["free"]:
                        found, conn = await self._keyed_try_lock(record)
                        if found is not None or conn is not None:
                            return found, conn
                        # Another process took the lock first: follow it.
                    waited = time.monotonic() - started
                    if self.wait_timeout is not None and waited >= self.wait_timeout:
                        holder = await self._borrowed(
                            "naming the leader", lambda c: self._holder(c, record.lock)
                        )
                        raise WaitTimeoutError(record.shown, self.describe(), waited, holder)
                    left = time_left(self.wait_timeout, waited)
                    if woken is None:
                        woken = stack.enter_context(wakeups.waiter(record.channel))
                        await wakeups.until_listening(min(self.recheck_interval, left))
                        continue
                    await Wakeups.woken(woken, min(self.recheck_interval, left))
                    failures = 0
                except BackendError as exc:
                    cause = exc.__cause__
                    # A server that is full now (max_connections) is waited out, as an outage.
                    full = isinstance(cause, asyncpg.exceptions.TooManyConnectionsError)
                    if not full and (not reached or not isinstance(cause, _OUTAGE_ERRORS)):
                        raise
                    left = time_left(self.wait_timeout, time.monotonic() - started)
                    if left <= 0:
                        raise
                    await anyio.sleep(min(backoff(failures), left))
                    failures += 1

    async def _borrowed(self, doing: str, query: Callable[[_Connection], Awaitable[_T]]) -> _T:
        """Run ``query`` on an idle connection of this loop's (or a new one, if none is, or the
        idle one turns out broken), and keep the connection idle again afterwards.

        At most ``_IDLE`` such queries of one loop run at once: followers woken together
        share a few connections rather than opening one each.

        Raises:
            BackendError: the database could not be reached or refused the query.
        """
        async with self._gate():
            conn = self._take_idle()
            if conn is not None:
                try:
                    result = await query(conn)
                except _DRIVER_ERRORS:
                    conn.terminate()  # e.g. the server restarted since: connect anew
                except BaseException:
                    conn.terminate()
                    raise
                else:
                    self._give_back(conn, True)
                    return result
            conn = await self._connect()
            try:
                with self._driver_errors(doing):
                    await self._ensure_keyed(conn)
                    result = await query(conn)
            except BaseException:
                conn.terminate()
                raise
            self._give_back(conn, True)
            return result

    def _gate(self) -> asyncio.Semaphore:
        """The running loop's gate of keyed reads and lock attempts (``_IDLE`` at once)."""
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(_IDLE)
        return gate

    def _take_idle(self) -> _Connection | None:
        idle = self._idle.get(asyncio.get_running_loop(), [])
        while idle:
            conn = idle.pop()
            if not conn.is_closed():
                return conn
        return None

    def _give_back(self, conn: _Connection, clean: bool) -> None:
        """Keep a connection that holds nothing for the next keyed call of this loop (up to
        ``_IDLE`` of them, while the loop's listener runs to close them); else end it."""
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(loop, [])
        if clean and loop in self._listeners and len(idle) < _IDLE and not conn.is_closed():
            idle.append(conn)
        else:
            conn.terminate()

    def _close_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        for conn in self._idle.pop(loop, []):
            conn.terminate()

    async def _keyed_try_lock(self, record: _KeyedRecord) -> tuple[str | None, _Connection | None]:
        """Try the key's lock on a connection of the caller's own: return (None, it) holding
        the lock to lead, (the result, None) if the last holder recorded one, or (None, None)
        if another process holds the lock.

        Through the loop's gate, as reads are: a burst of cold keys opens a few connections
        per process, not one per key; only a leader keeps its connection afterwards.
        """
        async with self._gate():
            return await self._keyed_try_lock_on(record, self._take_idle() or await self._connect())

    async def _keyed_try_lock_on(
        self, record: _KeyedRecord, conn: _Connection
    ) -> tuple[str | None, _Connection | None]:
        try:
            with self._driver_errors("taking the lock"):
                await self._ensure_keyed(conn)
                if self.lock == "session":
                    leading = await conn.fetchval("SELECT pg_try_advisory_lock($1)", record.lock)
                else:
                    await conn.execute("BEGIN")
                    leading = await conn.fetchval(
                        "SELECT pg_try_advisory_xact_lock($1)", record.lock
                    )
                    if not leading:
                        await conn.execute("ROLLBACK")
                if not leading:
                    self._give_back(conn, True)
                    return None, None
                # A statement after taking the lock sees what the last holder committed.
                try:
                    found = record.served(
                        await conn.fetchrow(self._keyed_read, *record.read), False
                    )
                except OnceCoolingDownError:
                    await self._unlock(conn, record.lock)
                    self._give_back(conn, True)
                    raise
                if found is None:
                    return None, conn
                await self._unlock(conn, record.lock)
        except OnceCoolingDownError:
            raise  # the connection is back, holding nothing
        except BaseException:
            conn.terminate()  # ends the session: releases the lock if it was taken
            raise
        self._give_back(conn, True)
        return found, None

    async def _keyed_failed(
        self, conn: _Connection, record: _KeyedRecord, cooldown: float | None
    ) -> None:
        """After the leader's failure: record ``cooldown`` (not the error), wake the waiters."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self.connect_timeout),
            contextlib.suppress(*_DRIVER_ERRORS),
        ):
            if cooldown is not None:
                await conn.execute(self._keyed_cool, record.name, record.key, cooldown, holder_id())
            # The followers woken must find the lock free: in session mode it is released
            # first; in transaction mode the NOTIFY is delivered by the COMMIT that releases it.
            if self.lock == "session":
                await self._unlock(conn, record.lock)
            await conn.execute("SELECT pg_notify($1, $2)", self._ends, record.channel)
            if self.lock != "session":
                await self._unlock(conn, record.lock)

    async def _unlock(self, conn: _Connection, key: int) -> None:
        if self.lock == "session":
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
        else:
            await conn.execute("COMMIT")  # releases the lock, publishes the writes and NOTIFY

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Delete ``name``'s row for ``key`` (a digest), or every key's row if None.

        Raises:
            BackendError: the database could not be reached or refused the query.
        """
        conn = await self._connect()
        try:
            with self._driver_errors("deleting keyed records"):
                await self._ensure_keyed(conn)
                if key is None:
                    await conn.execute(f"DELETE FROM {self._keyed} WHERE name = $1", name)
                else:
                    await conn.execute(
                        f"DELETE FROM {self._keyed} WHERE name = $1 AND key = $2", name, key
                    )
                # Processes that hold the key (or keys) forget it: see _listen.
                message = reset_message(name, key, self._me)
                await conn.execute("SELECT pg_notify($1, $2)", self._resets, message)
        finally:
            await _close(conn)

    async def _forget_resets(self, wakeups: Wakeups) -> None:
        """Listen (see :meth:`_listen`); on the way out, end the idle connections."""
        try:
            await self._listen(wakeups)
        finally:
            loop = asyncio.get_running_loop()
            self._close_idle(loop)
            self._gates.pop(loop, None)

    async def _listen(self, wakeups: Wakeups) -> None:
        """Until cancelled, on one connection: forget keys other processes reset, and wake this
        loop's followers of a keyed record when its leader NOTIFYs its end.

        The connection LISTENs on both channels; every ``check_interval`` without a message it
        checks that its session is alive (a dead one receives nothing). After an outage it
        listens again, with backoff, and then wakes every follower to check again (what was
        announced meanwhile was missed).
        """
        failures = 0
        while True:
            conn: _Connection | None = None
            try:
                conn = await self._connect()
                messages: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

                def heard(*args: Any, queue: asyncio.Queue[tuple[str, str]] = messages) -> None:
                    queue.put_nowait((str(args[2]), str(args[3])))  # channel, payload

                await conn.add_listener(self._resets, heard)
                await conn.add_listener(self._ends, heard)
                # LISTEN has taken effect: a NOTIFY committed from here on reaches this loop.
                failures = 0
                wakeups.listening.set()
                wakeups.wake_all()
                while True:
                    message: tuple[str, str] | None = None
                    with anyio.move_on_after(self.check_interval):
                        message = await messages.get()
                    if message is None:
                        await conn.fetchval("SELECT 1", timeout=self.check_interval)
                    elif message[0] == self._ends:
                        wakeups.wake(message[1])
                    else:
                        forget_reset(message[1], self._me, self._forget)
            except (*_DRIVER_ERRORS, BackendError):
                pass  # the server went away: listen again, after a backoff
            finally:
                wakeups.listening.clear()
                if conn is not None:
                    conn.terminate()
            await anyio.sleep(backoff(failures, cap=5.0))
            failures += 1

    async def _ensure_keyed(self, conn: _Connection) -> None:
        await self._ensure_table(conn)  # the fencing sequence
        if self._keyed_ready:
            return
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", self._keyed):
            index = "fastapi_once_" + hashlib.sha256(self._keyed.encode()).hexdigest()[:24]
            await conn.execute(
                f"SELECT pg_advisory_xact_lock({_lock_key(self.table, '')}); "
                f"CREATE TABLE IF NOT EXISTS {self._keyed} ("
                "name text NOT NULL, key text NOT NULL, result text, made_at timestamptz, "
                "value_until timestamptz, cool_until timestamptz, "
                "expires_at timestamptz NOT NULL, done_by text NOT NULL, "
                "PRIMARY KEY (name, key)); "
                f"CREATE INDEX IF NOT EXISTS {index} ON {self._keyed} (expires_at)"
            )
        self._keyed_ready = True

    @property
    def _keyed_read(self) -> str:
        # $3: the refresh age in seconds, or NULL.
        return (
            "SELECT CASE WHEN value_until > now() THEN result END AS result, "
            "coalesce(made_at <= now() - make_interval(secs => $3::float8), false) AS stale, "
            "extract(epoch FROM cool_until - now())::float8 AS cool_left "
            f"FROM {self._keyed} WHERE name = $1 AND key = $2"
        )

    @property
    def _keyed_peek(self) -> str:
        # One row whether or not the record exists; free as in _peek.
        return (
            "SELECT r.result, r.stale, r.cool_left, "
            "pg_try_advisory_xact_lock_shared($4) AS free "
            f"FROM (SELECT 1) AS one LEFT JOIN ({self._keyed_read}) AS r ON true"
        )

    @property
    def _keyed_record(self) -> str:
        # One statement: delete up to 100 expired rows of other keys (bounded work per write
        # keeps the table near one ttl window of keys), write this key's row, and NOTIFY the
        # keyed channel naming the record (delivered at commit). $1 name, $2 key, $3 result,
        # $4 ttl, $5 by, $6 the record's name in notifications. Times are clock_timestamp(),
        # not now(): with lock="transaction" the transaction began when the lock was taken,
        # before the work ran, and the ttl runs from when the value is recorded.
        return (
            f"WITH pruned AS (DELETE FROM {self._keyed} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {self._keyed} WHERE expires_at < now() "
            "AND NOT (name = $1 AND key = $2) LIMIT 100 FOR UPDATE SKIP LOCKED))), "
            f"written AS (INSERT INTO {self._keyed} AS k (name, key, result, made_at, "
            "value_until, expires_at, done_by) VALUES ($1, $2, $3, clock_timestamp(), "
            "clock_timestamp() + make_interval(secs => $4::float8), "
            "clock_timestamp() + make_interval(secs => $4::float8), $5) "
            "ON CONFLICT (name, key) DO UPDATE SET result = EXCLUDED.result, "
            "made_at = EXCLUDED.made_at, value_until = EXCLUDED.value_until, "
            "cool_until = NULL, expires_at = EXCLUDED.expires_at, done_by = EXCLUDED.done_by "
            "RETURNING 1) "
            f"SELECT pg_notify('{self._ends}', $6) FROM written"
        )

    @property
    def _keyed_cool(self) -> str:
        return (
            f"INSERT INTO {self._keyed} AS k (name, key, cool_until, expires_at, done_by) "
            "VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3::float8), "
            "clock_timestamp() + make_interval(secs => $3::float8), $4) "
            "ON CONFLICT (name, key) DO UPDATE SET cool_until = EXCLUDED.cool_until, "
            "expires_at = greatest(k.expires_at, EXCLUDED.expires_at), "
            "done_by = EXCLUDED.done_by"
        )

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
        # clock_timestamp(), not now(): see _keyed_record.
        return (
            f"INSERT INTO {self._quoted} (name, result, expires_at, done_at, done_by) "
            "VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3::float8), "
            "clock_timestamp(), $4) "
            "ON CONFLICT (name) DO UPDATE SET result = EXCLUDED.result, "
            "expires_at = EXCLUDED.expires_at, done_at = clock_timestamp(), "
            "done_by = EXCLUDED.done_by"
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


class _KeyedRecord:
    """Where one key's record of a keyed once lives, and what a read of it means."""

    def __init__(self, table: str, name: str, key: str, shown: str, refresh: float | None):
        self.name, self.key, self.shown = name, key, shown
        self.read = (name, key, refresh)  # the arguments of _keyed_read
        self.lock = _lock_key(f"{table}\0keyed", f"{name}\0{key}")
        digest = hashlib.sha256(f"{table}\0{name}\0{key}".encode()).hexdigest()
        self.channel = "fastapi_once_" + digest[:40]  # names the record in notifications

    def served(self, row: Any, stale_ok: bool) -> str | None:
        """The result to serve, or None to lead (or, without the lock, to wait).

        A result due for refresh is served only when ``stale_ok`` (another process holds the
        lock to refresh it) or while a failed refresh cools down; otherwise it is to be made
        again. Without a result, a cooldown raises.

        Raises:
            OnceCoolingDownError: no result, and another process's failure cools down.
        """
        if row is None:
            return None
        result, cool = row["result"], row["cool_left"]
        cooling = cool is not None and cool > 0
        if result is not None and (stale_ok or not row["stale"] or cooling):
            return str(result)
        if result is None and cooling:
            raise OnceCoolingDownError(self.shown, float(cool))
        return None


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
