"""The contract every cross-process backend fulfils, and the helpers the stores share."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import random
import re
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeAlias, TypeVar, overload
from urllib.parse import unquote, urlsplit

from .._errors import BackendError
from ._store import StoreUnavailableError

#: How long a follower waits for the leader by default, in seconds (``wait_timeout=``).
DEFAULT_WAIT_TIMEOUT = 300.0

T = TypeVar("T")

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

        One process runs ``work()`` as leader and records its (JSON-serialisable) result for
        ``ttl`` seconds (if given); the others wait (never skip) and get that result. When a
        leader fails or dies nothing is recorded and one follower leads. Every process, the
        leader included, gets the result as JSON decodes it (``once()`` turns typed results
        into JSON data before, and back after).

        Raises:
            TypeError: the result is not JSON-serialisable.
            TimeoutError: a follower waited longer than the backend's ``wait_timeout``.
            Exception: what ``work`` raised, in the process that ran it.
        """

    @abc.abstractmethod
    async def reset(self, name: str) -> None:
        """Clear ``name``'s record, so that the next ``run_once`` runs the work."""

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
        """As :meth:`run_once`, for one key of a keyed once.

        Args:
            name: the once's name.
            key: the key's digest (``shared_key_digest``), never the key itself.
            work: makes the result (runs in this process only if it leads).
            ttl: seconds the record lives.
            cooldown: seconds a failure is recorded (without its text), during which other
                processes raise :class:`~fastapi_once.OnceCoolingDownError`; or None.
            refresh: age in seconds after which one process makes the record again while the
                others keep getting it; or None.

        Raises:
            TypeError: this backend does not keep keyed records (the default).
        """
        raise TypeError(
            f"{self.describe()} does not share keyed values (once(key=..., across=...)); use "
            "a backend from fastapi_once.backends"
        )

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Delete ``name``'s record for ``key`` (a digest), or every key's record if None.

        Raises:
            TypeError: this backend does not keep keyed records (the default).
        """
        raise TypeError(f"{self.describe()} does not share keyed values")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections the backend holds."""

    def attach(self, forget: Callable[[str, str | None], None]) -> None:
        """Take the callback that makes this process forget what another process reset.

        ``once()`` hands it over when it binds the backend: ``forget(name, key)`` forgets, in
        the running event loop, the once's value for ``key`` (a digest), or every value of the
        once if None. It does not block and never raises.
        """
        self._forget = forget

    #: The core's callback for resets heard (see :meth:`attach`); None until bound.
    _forget: Callable[[str, str | None], None] | None = None

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for errors, logs and status; never includes secrets."""

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class PerLoop(Generic[T]):
    """A store's driver object (a client, a pool: bound to their loop) per asyncio event loop,
    made by ``make`` at the loop's first use; the entry goes with the loop, or :meth:`pop`.
    Only the loop's own thread touches its entry."""

    def __init__(self, make: Callable[[], T], refusal: str) -> None:
        self._make, self._refusal = make, refusal
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T]
        self._made = weakref.WeakKeyDictionary()

    def get(self) -> T:
        """The running loop's object; RuntimeError(``refusal``) if the loop is not asyncio's."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(self._refusal) from None
        made = self._made.get(loop)
        if made is None:
            made = self._made[loop] = self._make()
        return made

    def pop(self, made: T | None = None) -> T | None:
        """Take the running loop's object out (only if it is ``made``, when given) and return
        it: the next :meth:`get` makes another."""
        loop = asyncio.get_running_loop()
        if made is not None and self._made.get(loop) is not made:
            return None
        return self._made.pop(loop, None)


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


def whole(owner: str, option: str, value: int, *, least: int, unit: str = "") -> int:
    """Return ``value`` if it is a whole number of at least ``least``; else raise ValueError
    naming ``owner``'s option, the value and the fix (``unit``: what the number counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"{owner}({option}={value!r}): give a whole number of at least {least}{unit}"
        )
    return value


def holder_id() -> str:
    """Who this process is, for other processes' messages: ``"pid 1234 on web-1"``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def backoff(attempt: int, *, first: float = 0.05, cap: float = 1.0) -> float:
    """Seconds to sleep before reconnecting after ``attempt`` failures: doubling, jittered."""
    ceiling: float = min(cap, first * 2 ** min(attempt, 16))
    return random.uniform(0.5, 1.0) * ceiling


_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


class Scrubber:
    """Masks the password of one connection string (a URL, or libpq ``key=value`` text)
    wherever it shows in a text: a backend's description, a driver's error message."""

    def __init__(self, connection: str) -> None:
        match = _PASSWORD_PARAM.search(connection)
        if match:
            value = match.group(2)
            found = {value, re.sub(r"\\(.)", r"\1", value[1:-1])} if value[0] == "'" else {value}
        else:
            try:
                password = urlsplit(connection).password
            except ValueError:
                password = None
            found = {password, unquote(password)} if password else set()
        # The password as written and as decoded, longest first.
        self._passwords = sorted((p for p in found if p), key=len, reverse=True)
        self.shown = self(connection)

    def __call__(self, text: str) -> str:
        """Return ``text`` with the password, and any URL or ``password=`` value, as ``***``."""
        for password in self._passwords:
            text = text.replace(password, "***")
        text = _PASSWORD_PARAM.sub(r"\1***", text)
        return _URL_PASSWORD.sub(r"\1***@", text)


#: Which of a driver's errors are of a kind: these classes, or those a test says yes to.
ErrorKind: TypeAlias = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


def error_code(exc: BaseException) -> int | None:
    """A driver error's numeric code (its first argument, by the DB-API drivers' custom)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None


@contextlib.contextmanager
def store_errors(
    store: str, doing: str, errors: ErrorKind, *, outage: ErrorKind, refused: ErrorKind = ()
) -> Iterator[None]:
    """Raise a driver's ``errors`` in the block as the store's: a ``refused`` login or database,
    or an ``outage`` (:class:`StoreUnavailableError`), or any other failure (``BackendError``).

    The message names the ``store`` (its description), what it was ``doing``, and the error's
    type and code, never the driver's text (it may hold a password or a client's key). A
    ``BackendError`` raised in the block goes on as it is.
    """
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        if not _is(exc, errors):
            raise
        code = error_code(exc)
        what = type(exc).__name__ + ("" if code is None else f" {code}")
        failed = f"{store}: failed {doing}:"
        if _is(exc, refused):
            raise BackendError(
                f"{failed} the server refused the login or the database ({what}); check the "
                "user, password and database in the URL"
            ) from exc
        if _is(exc, outage):
            raise StoreUnavailableError(f"{failed} cannot be reached ({what})") from exc
        raise BackendError(f"{failed} the server answered with an error ({what})") from exc


def _is(exc: Exception, kind: ErrorKind) -> bool:
    return isinstance(exc, kind) if isinstance(kind, type | tuple) else kind(exc)
