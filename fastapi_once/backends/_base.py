"""The contract every cross-process backend fulfils, and what the backends share."""

from __future__ import annotations

import abc
import contextvars
import json
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, overload
from urllib.parse import urlsplit, urlunsplit

from .._errors import OnceError


class Backend(abc.ABC):
    """Makes a piece of work run once across every process that shares the backend.

    ``once(fn, across=backend)`` calls :meth:`run_once` from the in-process single-flight
    attempt, so inside one process concurrent callers already share one call of it.
    """

    @abc.abstractmethod
    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        """Return the recorded result of ``name``, running ``work`` first if no process has.

        A fast "already done?" check comes before any lock. Otherwise take the lock, re-check
        the marker, run ``work()`` as leader, record its (JSON-serialisable) result and the
        marker (expiring after ``ttl`` seconds if given), release the lock, and return the
        result as JSON decodes it. Followers wait (never skip) and return the leader's recorded
        result; when a leader fails or dies, no marker is written and one follower becomes
        leader. Every process gets the same JSON-decoded result, the leader included.

        Raises:
            TypeError: the result is not JSON-serialisable.
            TimeoutError: a follower waited longer than the backend's ``wait_timeout``.
            Exception: what ``work`` raised, in the process that ran it.
        """

    @abc.abstractmethod
    async def reset(self, name: str) -> None:
        """Clear ``name``'s marker and result, so that the next ``run_once`` runs the work."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections the backend holds."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for errors, logs and status; never includes secrets."""

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


# --- errors ---------------------------------------------------------------------------------------


class WaitTimeoutError(OnceError, TimeoutError):
    """A follower waited longer than the backend's ``wait_timeout`` for the leader.

    Attributes:
        name: the once's name.
        backend: the backend's :meth:`Backend.describe`.
        waited: seconds waited.
        holder: who holds the lock (e.g. ``"pid 1234 on web-1"``), or None if unknown.
    """

    def __init__(self, name: str, backend: str, waited: float, holder: str | None) -> None:
        self.name = name
        self.backend = backend
        self.waited = waited
        self.holder = holder
        by = f"held by {holder}" if holder else "held by another process"
        super().__init__(
            f"waited {waited:.1f}s for {name} on {backend}: the lock is {by}, still running it; "
            "raise wait_timeout=, or check that process"
        )


class BackendError(OnceError):
    """The backend's store failed (unreachable, connection lost, server error).

    The driver's exception is the ``__cause__``; the message never includes credentials.
    """


class LeaseLostError(OnceError):
    """The leader lost its lock while its work ran, so its result was not recorded.

    Raised by :class:`~fastapi_once.backends.RedisBackend` when renewing or releasing the lease
    finds another owner (or none): another process may already be running the work.
    """

    def __init__(self, name: str, backend: str, why: str) -> None:
        self.name = name
        self.backend = backend
        super().__init__(
            f"{name} lost its lock on {backend} while running ({why}); its result was not "
            "recorded and another process may run it. Make the work idempotent or check "
            "fastapi_once.backends.fencing_token() before each write"
        )


# --- what the backends share ----------------------------------------------------------------------

# The fencing token of the lock held by the work running in this context; None outside one.
_fencing_token: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fastapi_once_fencing_token", default=None
)


def fencing_token() -> int | None:
    """Return the fencing token of the lock under which the current work runs, or None.

    A :class:`~fastapi_once.backends.RedisBackend` leader draws a token from a per-name counter
    that only grows, so a leader that took over after another one's lease expired has a larger
    token. Pass it along with each write the work makes to a store that can compare it (e.g.
    ``UPDATE ... WHERE fence < :token``), so that writes from a paused, superseded leader are
    refused. Other backends do not set it (their locks end with the holder's process or session).
    """
    return _fencing_token.get()


class _Refused(TypeError):
    def __init__(self, obj: object) -> None:
        self.what = type(obj).__qualname__


def _refuse(obj: object) -> object:
    raise _Refused(obj)


def encode_result(name: str, value: object, backend: str) -> str:
    """Return ``value`` as JSON text.

    Raises:
        TypeError: ``value`` is not JSON-serialisable (naming the once and the offending type).
    """
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), default=_refuse)
    except (TypeError, ValueError) as exc:
        what = type(value).__qualname__
        if isinstance(exc, _Refused):
            detail = what if exc.what == what else f"{what} containing a {exc.what} value"
        else:  # e.g. a non-string key, NaN, a circular reference
            detail = f"{what} ({exc})"
        raise TypeError(
            f"{name}'s result is not JSON-serialisable: type {detail}; a once with across= "
            f"shares its result with other processes through {backend} as JSON. Return plain "
            "data (dict, list, str, int, float, bool, None)"
        ) from None


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


def holder_id() -> str:
    """Who this process is, for other processes' messages: ``"pid 1234 on web-1"``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Return ``url`` (a URL or a libpq ``key=value`` string) with any password replaced by ***."""
    masked = _PASSWORD_PARAM.sub(r"\1***", url)
    try:
        parts = urlsplit(masked)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return masked
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
