"""Every option of ``once()``, ``once_lifespan()`` and ``readiness_router()``, checked here.

Each is checked when the object is made, never later: a ``TypeError`` for the wrong type (a
bool is not a number), a ``ValueError`` for a value out of range (NaN, an infinity, a negative
or zero duration, an integer too large for a float, a path without a leading ``/``). Every
message names the function, the option, the value given and the fix. The backends check their
own constructor's options.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Literal

from ._kinds import Kind, kind_of
from ._policy import Policy

if sys.version_info >= (3, 12):  # pragma: no cover
    from typing import TypedDict
else:  # pragma: no cover
    from typing_extensions import TypedDict

if TYPE_CHECKING:
    from .backends._late import Across

DEFAULT_MAXSIZE = 128


class Options(TypedDict, total=False):
    """The keyword options of :func:`~fastapi_once.once` other than ``key`` (each documented
    there)."""

    maxsize: int
    across: Across
    on_backend_error: Literal["local", "raise"]
    name: str
    version: str | int
    timeout: float
    retries: int
    backoff: float
    retry_on: type[BaseException] | tuple[type[BaseException], ...]
    cooldown: float
    ttl: float
    refresh: float
    jitter: float
    stale_if_error: float
    ping: Callable[[Any], Any]
    log_keys: bool
    scope: Literal["loop", "process"]


#: The options of ``once()``: the one list is :class:`Options`.
ONCE_OPTIONS = frozenset({"key", *Options.__optional_keys__})

# The options of once() that take seconds and are off when left out.
_ONCE_SECONDS = ("timeout", "cooldown", "ttl", "refresh", "stale_if_error", "jitter")


def shown(value: object) -> str:
    """``repr(value)`` for a message; an integer too long to print is described instead."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        digits = math.floor(math.log10(abs(value))) + 1
        return f"<an integer of {digits} digits>"
    return repr(value)


def _call(function: str, subject: str | None, option: str, value: object) -> str:
    """How a message names the mistake: ``once(app.get_db, ttl=-1)``."""
    head = f"{subject}, " if subject else ""
    return f"{function}({head}{option}={shown(value)})"


def seconds(
    function: str,
    option: str,
    value: object,
    *,
    subject: str | None = None,
    zero_ok: bool = False,
    fix: str,
) -> float:
    """Return ``value`` as a float: a finite number of seconds, positive (or zero if allowed).

    Args:
        function: the function the option belongs to, for the message.
        option: the option's name.
        value: what was given.
        subject: what the function was called on (a once's name), if anything.
        zero_ok: whether 0 is allowed.
        fix: what to do instead of a value out of range, ending the message.

    Raises:
        TypeError: ``value`` is not an int or float (a bool included).
        ValueError: NaN, an infinity, too large for a float, negative, or zero unless allowed.
    """
    call = _call(function, subject, option, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{call}: {option} takes seconds as a number (int or float); {fix}")
    try:
        number = float(value)
    except OverflowError:  # an int no float holds: too large, or below zero
        if value > 0:
            raise ValueError(
                f"{call}: {option} is too large for a number of seconds; {fix}"
            ) from None
        number = -math.inf
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{call}: {option} must be a finite number of seconds; {fix}")
    if number < 0 or (number == 0 and not zero_ok):
        least = "zero or more seconds" if zero_ok else "a positive number of seconds"
        raise ValueError(f"{call}: {option} must be {least}; {fix}")
    return number


def whole(
    function: str, option: str, value: object, *, minimum: int, subject: str | None, means: str
) -> int:
    """Return ``value``, a whole number >= ``minimum``; ``means`` says what it must be.

    Raises:
        TypeError: not an int (a bool included).
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        error = ValueError if isinstance(value, int) and not isinstance(value, bool) else TypeError
        raise error(f"{_call(function, subject, option, value)}: {option} must be {means}")
    return value


def flag(function: str, option: str, value: object) -> bool:
    """Return ``value``, which must be True or False.

    Raises:
        TypeError: anything else (``"no"`` and ``0`` included: a typo must not turn it on).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{_call(function, None, option, value)}: {option} takes True or False")
    return value


# --- once() ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OnceOptions:
    """The checked options of one ``once()``: what ``Once`` is built from."""

    name: str  # with @version
    key: Callable[..., Hashable] | None
    maxsize: int
    scope: str
    policy: Policy


def once_options(fn: Callable[..., Any], default_name: str, options: dict[str, Any]) -> OnceOptions:
    """Check the options of ``once(fn, **options)`` (``across=`` is bound by the caller).

    Raises:
        TypeError: an unknown option, an option of the wrong type, or options that do not fit
            together (e.g. ``maxsize=`` without ``key=``).
        ValueError: an option out of range.
    """
    name = options.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise TypeError(f"once(name={shown(name)}): name= must be a non-empty string")
    unknown = set(options) - ONCE_OPTIONS
    if unknown:
        raise TypeError(
            f"once({name}): unknown option(s) {', '.join(sorted(unknown))}; "
            f"the options are {', '.join(sorted(ONCE_OPTIONS))}"
        )
    version = options.get("version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise TypeError(
                f"{_call('once', name, 'version', version)}: version= takes a string or an "
                "int, appended to the name (name@version), e.g. version=2"
            )
        name = f"{name}@{version}"
    key = options.get("key")
    keyed = key is not None
    if keyed and not callable(key):
        raise TypeError(
            f"once({name}, key={shown(key)}): key= takes a function of {name}'s request-data "
            "parameters that returns a hashable key, e.g. key=lambda url: url"
        )
    maxsize = whole(
        "once",
        "maxsize",
        options.get("maxsize", DEFAULT_MAXSIZE),
        minimum=1,
        subject=name,
        means="a positive integer, the number of keyed values to keep, e.g. maxsize=1000",
    )
    if "maxsize" in options and not keyed:
        raise TypeError(
            f"once({name}, maxsize=...): maxsize= applies only with key=; pass key= too"
        )
    log_keys = options.get("log_keys")
    if log_keys is not None and (not isinstance(log_keys, bool) or not keyed):
        raise TypeError(
            f"once({name}, log_keys={shown(log_keys)}): log_keys= takes True or False and "
            "applies only with key="
        )
    ping = options.get("ping")
    if ping is not None and (not callable(ping) or keyed):
        raise TypeError(
            f"once({name}, ping={shown(ping)}): ping= takes a function check(value) for an "
            "unkeyed once, e.g. ping=lambda pool: pool.execute('SELECT 1')"
        )
    if "on_backend_error" in options and options.get("across") is None:
        raise TypeError(
            f"once({name}, on_backend_error=...): on_backend_error= applies only with across=; "
            "pass across= too"
        )
    scope = options.get("scope", "loop")
    if scope not in ("loop", "process"):
        raise ValueError(
            f"once({name}, scope={shown(scope)}): scope= is 'loop' (one value per event loop, "
            "the default) or 'process' (one value shared by every loop and thread)"
        )
    if scope == "process" and kind_of(fn) is Kind.ASYNC_GEN:
        raise TypeError(
            f"once({name}, scope='process'): an async generator's value and cleanup belong to "
            "the event loop that made it, which other loops cannot use; make it a def generator "
            "or an async def, or keep scope='loop'"
        )
    return OnceOptions(name, key, maxsize, scope, _policy(name, options))


def check_across(
    fn: Callable[..., Any], name: str, options: dict[str, Any]
) -> Literal["local", "raise"]:
    """Check that ``across=`` fits the once's other options and its function; return what
    the once does when the backend cannot be reached (``on_backend_error=``, by default
    ``"local"`` for a keyed once and ``"raise"`` for an unkeyed one).

    Raises:
        TypeError: a keyed once without ``ttl=``, or a generator function.
        ValueError: ``on_backend_error=`` is neither ``"local"`` nor ``"raise"``.
    """
    if options.get("key") is not None and options.get("ttl") is None:
        raise TypeError(
            f"once({name}, across=..., key=...): a keyed once across processes needs ttl=, so "
            "that every key's record in the backend expires (keys come from requests: without "
            "it, distinct keys would grow the store without bound); e.g. ttl=60"
        )
    if kind_of(fn) in (Kind.ASYNC_GEN, Kind.GEN):
        raise TypeError(
            f"once({name}, across=...): a generator's cleanup would run in one process only; "
            "across= takes an async def or def whose JSON result every process shares"
        )
    keyed = options.get("key") is not None
    on_error = options.get("on_backend_error", "local" if keyed else "raise")
    if on_error not in ("local", "raise"):
        raise ValueError(
            f"{_call('once', name, 'on_backend_error', on_error)}: give 'local' (make the value "
            "in this process while the backend cannot be reached) or 'raise' (BackendError)"
        )
    return "local" if on_error == "local" else "raise"


def _policy(name: str, options: dict[str, Any]) -> Policy:
    """The timing and failure options of ``once(name, **options)``, checked."""
    timing: dict[str, float | None] = {}
    for option in _ONCE_SECONDS:
        value = options.get(option)
        timing[option] = (
            None
            if value is None
            else seconds(
                "once", option, value, subject=name, fix=f"leave {option} out to turn it off"
            )
        )
    retries = whole(
        "once",
        "retries",
        options.get("retries", 0),
        minimum=0,
        subject=name,
        means="a whole number >= 0, the number of extra tries within one attempt",
    )
    backoff = seconds(
        "once",
        "backoff",
        options.get("backoff", 0.1),
        subject=name,
        zero_ok=True,
        fix="give the first retry's delay, e.g. backoff=0.5",
    )
    retry_on = options.get("retry_on", (Exception,))
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    if not (
        isinstance(retry_on, tuple)
        and retry_on
        and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on)
    ):
        raise TypeError(
            f"once({name}, retry_on={shown(retry_on)}): retry_on takes an exception class or a "
            "tuple of them, e.g. retry_on=(ConnectionError, TimeoutError)"
        )
    if ("backoff" in options or "retry_on" in options) and not retries:
        raise TypeError(f"once({name}): backoff= and retry_on= apply only with retries=")
    ttl, refresh = timing["ttl"], timing["refresh"]
    if timing["jitter"] is not None and ttl is None and refresh is None:
        raise TypeError(f"once({name}, jitter=...): jitter= applies only with ttl= or refresh=")
    if timing["stale_if_error"] is not None and ttl is None:
        raise TypeError(
            f"once({name}, stale_if_error=...): stale_if_error= is how long a value may be "
            "served past its ttl while making a new one fails, so it applies only with ttl=; "
            "pass ttl= too"
        )
    if refresh is not None and ttl is not None and refresh >= ttl:
        raise ValueError(
            f"once({name}, ttl={shown(options['ttl'])}, refresh={shown(options['refresh'])}): "
            "refresh must be shorter than ttl, so the value is refreshed before it expires"
        )
    return Policy(
        timeout=timing["timeout"],
        retries=retries,
        backoff=backoff,
        retry_on=retry_on,
        cooldown=timing["cooldown"],
        ttl=ttl,
        refresh=refresh,
        jitter=timing["jitter"],
        stale_if_error=timing["stale_if_error"],
        log_keys=options.get("log_keys", False),
    )


# --- once_lifespan() and readiness_router() --------------------------------------------------


def lifespan_options(
    lifespan: object, shutdown_timeout: object, reset_process_scope: object
) -> float:
    """Check ``once_lifespan``'s options; return ``shutdown_timeout`` in seconds.

    Raises:
        TypeError: ``lifespan`` is not callable (nor None), ``shutdown_timeout`` is not a
            number, or ``reset_process_scope`` is not a bool.
        ValueError: ``shutdown_timeout`` is not a positive, finite number.
    """
    if lifespan is not None and not callable(lifespan):
        raise TypeError(
            f"once_lifespan(lifespan={shown(lifespan)}): lifespan= takes the app's own lifespan, "
            "a function of the app returning an async context manager (e.g. one made with "
            "@asynccontextmanager), or None"
        )
    timeout = seconds(
        "once_lifespan",
        "shutdown_timeout",
        shutdown_timeout,
        fix="give the seconds shutdown may wait, e.g. shutdown_timeout=10 (within the "
        "server's grace period, 30 s on Kubernetes by default)",
    )
    flag("once_lifespan", "reset_process_scope", reset_process_scope)
    return timeout


def readiness_options(
    path: object,
    details: object,
    retry_after: object,
    warm: object,
    ping_timeout: object,
    ping_every: object,
) -> None:
    """Check ``readiness_router``'s options.

    Raises:
        TypeError: an option of the wrong type.
        ValueError: a path without a leading ``/``, a ``retry_after`` below 0 or above a day,
            or a ping interval that is not a positive, finite number of seconds.
    """
    function = "readiness_router"
    if not isinstance(path, str):
        raise TypeError(
            f"{_call(function, None, 'path', path)}: path takes the route's path as a string, "
            "e.g. path='/ready'"
        )
    if not path.startswith("/"):
        raise ValueError(
            f"{_call(function, None, 'path', path)}: a route's path starts with '/', or the "
            f"probe is never reached; use path={'/' + path!r}"
        )
    means = "whole seconds from 0 to 86400 (a day), sent in Retry-After with a 503, e.g. 5"
    after = whole(function, "retry_after", retry_after, minimum=0, subject=None, means=means)
    if after > 86_400:
        raise ValueError(
            f"{_call(function, None, 'retry_after', after)}: retry_after must be {means}"
        )
    flag(function, "details", details)
    flag(function, "warm", warm)
    seconds(
        function,
        "ping_timeout",
        ping_timeout,
        fix="give the seconds a ping may take, e.g. ping_timeout=2",
    )
    seconds(
        function,
        "ping_every",
        ping_every,
        fix="give the seconds a ping's result is reused, e.g. ping_every=1",
    )
