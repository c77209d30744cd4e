"""The contract every cross-process backend fulfils, and what the backends share."""

from __future__ import annotations

import abc
import contextvars
import logging
import os
import random
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, overload
from urllib.parse import unquote, urlsplit

import anyio

from .._errors import LeaseLostError

logger = logging.getLogger("fastapi_once")

#: How long a follower waits for the leader by default, in seconds (``wait_timeout=``).
DEFAULT_WAIT_TIMEOUT = 300.0

#: The largest value a backend records by default, in bytes of JSON (``max_value_bytes=``).
DEFAULT_MAX_VALUE_BYTES = 1 << 20


class Backend(abc.ABC):
    """Makes a piece of work run once across every process that shares the backend.

    ``once(fn, across=backend)`` calls :meth:`run_once` (or :meth:`run_keyed`) from the
    in-process single-flight attempt, so inside one process concurrent callers already share one
    call of it. The package's backends are stores of one lease algorithm
    (``fastapi_once.backends._lease.StoreBackend``, which also applies ``on_backend_error=``);
    a backend of your own may subclass this class and implement these methods itself.
    """

    @abc.abstractmethod
    async def run_once(
        self,
        name: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
    ) -> Any:
        """Return the recorded result of ``name``, running ``work`` first if no process has.

        A fast "already done?" check comes before any lock. Otherwise take the lock, re-check
        the marker, run ``work()`` as leader, record its (JSON-serialisable) result and the
        marker (expiring after ``ttl`` seconds if given), release the lock, and return the
        result as JSON decodes it. Followers wait (never skip) and return the leader's recorded
        result; when a leader fails or dies, no marker is written and one follower becomes
        leader. Every process gets the same JSON-decoded result, the leader included.
        (``once()`` turns typed results into JSON data before, and back after.)

        Raises:
            TypeError: the result is not JSON-serialisable.
            TimeoutError: a follower waited longer than the backend's ``wait_timeout``.
            Exception: what ``work`` raised, in the process that ran it.
        """

    @abc.abstractmethod
    async def reset(self, name: str) -> None:
        """Clear ``name``'s marker and result, so that the next ``run_once`` runs the work."""

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
        """Return the recorded result of ``name`` for ``key``, running ``work`` first if due.

        As :meth:`run_once`, for one key of a keyed once: the record expires after ``ttl``
        seconds; a failure of ``work`` is recorded (without its text) for ``cooldown`` seconds,
        during which other processes raise :class:`~fastapi_once.OnceCoolingDownError`; with
        ``refresh``, a record older than that is made again by one process while the others
        keep getting it. Backends that cannot keep keyed records refuse.

        Args:
            name: the once's name.
            key: the key's digest (``shared_key_digest``), never the key itself.
            work: makes the result (runs in this process only if it leads).
            ttl: seconds the record lives.
            cooldown: seconds a failure is recorded for, or None.
            refresh: age in seconds after which the record is made again, or None.

        Raises:
            TypeError: this backend does not keep keyed records.
        """
        raise TypeError(
            f"{self.describe()} does not share keyed values (once(key=..., across=...)); use "
            "RedisBackend or PostgresBackend"
        )

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Delete ``name``'s record for ``key`` (a digest), or every key's record if None.

        Raises:
            TypeError: this backend does not keep keyed records.
        """
        raise TypeError(f"{self.describe()} does not share keyed values")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections the backend holds."""

    def attach(self, forget: Callable[[str, str | None], None]) -> None:
        """Take the callback that makes this process forget what another process reset.

        ``once()`` hands it over when it binds the backend: ``forget(name, key)`` forgets, in
        the running event loop, the once's value for ``key`` (a digest), or every value of the
        once if None. It does not block and never raises. The backends import nothing from the
        core; this is how their listeners reach it.
        """
        self._forget = forget

    #: The core's callback for resets heard (see :meth:`attach`); None until bound.
    _forget: Callable[[str, str | None], None] | None = None

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for errors, logs and status; never includes secrets."""

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


# --- what the backends share ----------------------------------------------------------------------

# The fencing token of the lock held by the work running in this context; None outside one.
_fencing_token: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fastapi_once_fencing_token", default=None
)


def fencing_token() -> int | None:
    """Return the fencing token of the lock under which the current work runs, or None.

    Pass it along with each write the work makes to a store that can compare it (e.g.
    ``UPDATE ... SET fence = :token WHERE fence < :token``), so that writes from a paused,
    superseded leader are refused. What it guarantees depends on the backend:

    - :class:`~fastapi_once.backends.RedisBackend`: each leader draws a token greater than every
      token drawn before it for that name, also after Redis restarts and loses its data: the
      counter never falls below the server's clock in microseconds. (It can go backwards only
      if the server's clock is set back further than the time since the last leader started.)
    - :class:`~fastapi_once.backends.PostgresBackend`: the token comes from a sequence in the
      database (``<table>_fence``), so it grows with every leader of every name and survives
      restarts and crashes (not restoring an older backup of the database).
    - :class:`~fastapi_once.backends.FileLockBackend`: None; its lock ends with the holder's
      process, so no second leader can start while the first still runs.
    """
    return _fencing_token.get()


async def run_guarded(
    name: str,
    backend: str,
    fence: int | None,
    work: Callable[[], Awaitable[Any]],
    until_lost: Callable[[], Awaitable[str]],
) -> Any:
    """Run ``work`` with ``fence`` as its fencing token while ``until_lost()`` watches the lock.

    ``until_lost`` returns why the lock was lost, or runs until cancelled once the work is done.
    When it returns, the work is cancelled and :class:`LeaseLostError` raised.

    Raises:
        LeaseLostError: the lock was lost while the work ran.
        Exception: what ``work`` raised, unchanged (not in an exception group).
    """
    lost: str | None = None
    work_scope = anyio.CancelScope()

    async def watch() -> None:
        nonlocal lost
        lost = await until_lost()
        work_scope.cancel()

    result: Any = None
    error: BaseException | None = None
    token = _fencing_token.set(fence)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                # The work runs in this task, not in the task group, so that its exception
                # reaches the caller unchanged rather than inside an exception group.
                with work_scope:
                    result = await work()
            except BaseException as exc:
                error = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        _fencing_token.reset(token)
    if lost is not None:
        raise LeaseLostError(name, backend, lost) from error
    if error is not None:
        raise error
    return result


@overload
def seconds(option: str, value: float) -> float: ...
@overload
def seconds(option: str, value: float | None) -> float | None: ...
def seconds(option: str, value: float | None) -> float | None:
    """Return ``value`` as a float, checking that it is a positive number of seconds (or None).

    Raises:
        ValueError: ``value`` is not a positive number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{option}={value!r}: must be a positive number of seconds, or None")
    return float(value)


def check_size(name: str, text: str, limit: int | None, backend: str) -> None:
    """Refuse a result whose JSON text is longer than ``limit`` bytes (None: no limit).

    Raises:
        ValueError: the text is too long (naming the once, the size and the limit).
    """
    if limit is None:
        return
    size = len(text.encode())
    if size > limit:
        raise ValueError(
            f"{name}'s result is {size} bytes of JSON, over the limit of {limit} bytes of "
            f"{backend} (max_value_bytes=); it was not recorded. Return a smaller value, or "
            "raise max_value_bytes="
        )


def max_bytes(value: int | None) -> int | None:
    """Check ``max_value_bytes=``: a positive whole number of bytes, or None.

    Raises:
        ValueError: it is not.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"max_value_bytes={value!r}: give a positive whole number of bytes, or None for no "
            "limit"
        )
    return value


def holder_id() -> str:
    """Who this process is, for other processes' messages: ``"pid 1234 on web-1"``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def backoff(attempt: int, *, first: float = 0.05, cap: float = 1.0) -> float:
    """Seconds to sleep before reconnecting after ``attempt`` failures: doubling, jittered."""
    ceiling: float = min(cap, first * 2 ** min(attempt, 16))
    return random.uniform(0.5, 1.0) * ceiling


# --- secrets --------------------------------------------------------------------------------------

_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


class Scrubber:
    """Masks the password of one connection string wherever it shows in a text.

    The backends build one from their URL or DSN and pass every text that could quote it —
    their description, a driver's error message — through :meth:`__call__`.

    Args:
        connection: a URL (``redis://:pw@host``, ``postgresql://user:pw@host/db``) or a libpq
            ``key=value`` string (``host=db password=pw``).
    """

    def __init__(self, connection: str) -> None:
        self._passwords = _passwords_of(connection)
        self.shown = self(connection)

    def __call__(self, text: str) -> str:
        """Return ``text`` with the password, and any URL or ``password=`` value, as ``***``."""
        for password in self._passwords:
            text = text.replace(password, "***")
        text = _PASSWORD_PARAM.sub(r"\1***", text)
        return _URL_PASSWORD.sub(r"\1***@", text)


def _passwords_of(connection: str) -> list[str]:
    """The password in ``connection``, as written and as decoded, longest first."""
    match = _PASSWORD_PARAM.search(connection)
    if match:
        value = match.group(2)
        found = {value, re.sub(r"\\(.)", r"\1", value[1:-1])} if value[0] == "'" else {value}
    else:
        try:
            password = urlsplit(connection).password
        except ValueError:
            return []
        found = {password, unquote(password)} if password else set()
    return sorted((p for p in found if p), key=len, reverse=True)
