"""A readiness probe for FastAPI: 200 when the given onces can serve, 503 while they cannot.

A once can serve when it has a value (``ready``, ``refreshing``) that its ``ping=`` check, if
any, accepts. A probe never lets an idle once's value lapse for want of traffic: it starts a
refresh due before the ttl ends as a call would (with ``warm=`` or without), and with ``warm=``
a value that expired (after a success) being made again still counts as serving — requests
wait for it as they would on any expiry — so the probe does not flap once per ``ttl``. A
value kept past its ttl under ``stale_if_error=`` counts as serving too (requests get it, or
the new one): the probe marks it ``"stale": true``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from . import _clock
from ._core import Once
from ._errors import OnceClosedError
from ._fastapi import once
from ._keys import NOKEY
from ._kinds import Kind, kind_of
from ._loops import current_loop, in_process_loop, run_in_process_loop
from ._methods import refuse_class_level
from ._options import readiness_options
from ._records import CAN_REFRESH, SERVING
from ._status import OnceStatus
from ._telemetry import error_type, fields, ping_failed

logger = logging.getLogger("fastapi_once")

_SERVING = ("ready", "refreshing")


class _Ping:
    """The last ping of one once's value in one loop, and the ping in flight, if any."""

    __slots__ = ("at", "error", "running", "value")

    def __init__(self) -> None:
        self.value: object = None  # the value pinged (a new value is pinged anew)
        self.at: float | None = None  # when, on the clock of expiry and refresh
        self.error: tuple[str, str] | None = None  # type name and message, if it failed
        self.running: anyio.Event | None = None  # set when the ping in flight ends


class _ReturnedFalse(Exception):
    """A ping returned False: reported as such, not as an exception of the ping's."""


async def _check(check: Callable[[Any], Any], value: Any, limit: float) -> None:
    """Run ``check(value)`` within ``limit`` s (a sync one in a worker thread).

    Raises:
        TimeoutError: it took longer.
        Exception: what it raised, or ``_ReturnedFalse`` if it returned False.
    """
    with anyio.fail_after(limit):
        if kind_of(check) is Kind.ASYNC:
            result = await check(value)
        else:
            result = await anyio.to_thread.run_sync(check, value, abandon_on_cancel=True)
    if result is False:
        raise _ReturnedFalse("ping returned False")


async def _pinged(
    item: Once[Any, Any],
    value: Any,
    pings: dict[Once[Any, Any], _Ping],
    limit: float,
    every: float,
) -> tuple[str, str] | None:
    """The error of the latest ping of ``value``, pinging if the last is older than ``every``."""
    state = pings.setdefault(item, _Ping())
    while True:
        now = _clock.monotonic()
        if state.value is value and state.at is not None and now - state.at < every:
            return state.error
        if state.running is None:
            break
        await state.running.wait()  # one ping at a time: a probe storm shares it
    state.running = done = anyio.Event()
    try:
        await _check(item.options["ping"], value, limit)
    except Exception as exc:
        if isinstance(exc, _ReturnedFalse):
            kind, how = "returned False", "ping returned False"
        else:
            kind = "TimeoutError" if isinstance(exc, TimeoutError) else str(error_type(exc))
            how = f"ping failed with {kind}"
        state.error = (kind, str(exc) or f"no answer within {limit} s")
        ping_failed(item.name, kind)
        logger.warning(
            "%s: readiness %s",
            item.name,
            how,
            extra=fields(item.name, "ping_failed", error_type=kind),
        )
    else:
        state.error = None
    finally:
        state.running = None
        done.set()
    state.value, state.at = value, _clock.monotonic()
    return state.error


def readiness_router(
    *onces: Callable[..., Any],
    path: str = "/ready",
    details: bool = False,
    retry_after: int = 5,
    warm: bool = True,
    ping_timeout: float = 2.0,
    ping_every: float = 1.0,
) -> APIRouter:
    """Return a router with one ``GET path`` route for a readiness probe (e.g. Kubernetes').

    It answers 200 when every listed once can serve, else 503 with ``Retry-After``; the JSON
    body lists each once's state (and ``"ping": "ok" | "failed"`` for a once with ``ping=``).
    By default it shows no exception messages or tracebacks (they can hold secrets). Keep
    liveness separate: a failing dependency should take a pod out of rotation, not restart it.

    A once can serve when it has a value its ``ping=`` check (if any) accepts. The probe starts
    a refresh that is due (``refresh=``) before the value's ttl ends, as a call would and also
    with ``warm=False``, so an idle pod's value does not expire between probes; with
    ``warm=True``, a value that expired after a successful attempt and is being made again
    counts as serving (``"renewing": true``): requests would wait for it as on any expiry, and
    taking the pod out of rotation for that would make it flap.

    Args:
        *onces: the unkeyed onces (or functions, taken as ``once(fn)``) the app needs to serve.
        path: the route's path.
        details: also show each once's last error (type and message), attempt count, last
            duration, when its value was made, and a failed ping's error.
        retry_after: the ``Retry-After`` seconds sent with a 503.
        warm: a probe starts making any listed once that is idle, failed (outside its
            cooldown) or expired, without waiting for it — so a pod that receives no traffic
            until it is ready still becomes ready. With ``warm=False`` a probe makes no value
            that is not there; it still starts a due refresh of one that is.
        ping_timeout: seconds a ``ping=`` check may take before it counts as failed.
        ping_every: seconds a ping's result is reused, so that a probe storm does not hammer
            the dependency (concurrent probes share one ping in flight).

    Raises:
        TypeError: no onces, a keyed once (it has no single value to be ready), or a once method
            looked up on its class (pass an instance's: ``obj.method``); an option of the wrong
            type (``details`` and ``warm`` take a bool; a bool is not a number).
        ValueError: ``path`` does not start with ``/``; ``retry_after`` is not 0 to 86400; a
            ping interval is not a positive, finite number of seconds.
    """
    readiness_options(path, details, retry_after, warm, ping_timeout, ping_every)
    if not onces:
        raise TypeError("readiness_router() needs the onces that must be ready, e.g. (get_db,)")
    items: list[Once[Any, Any]] = [once(item) for item in onces]
    for item in items:
        refuse_class_level(item, "readiness_router")
        if item.keyed:
            raise TypeError(
                f"readiness_router({item.name}): a keyed once has one value per key, so it is "
                "never ready as a whole; list unkeyed onces"
            )
    router = APIRouter()
    # The pings of each event loop (a value belongs to one loop), dropped with it.
    pings: weakref.WeakKeyDictionary[object, dict[Once[Any, Any], _Ping]] = (
        weakref.WeakKeyDictionary()
    )

    async def probe(item: Once[Any, Any], app: object) -> dict[str, Any]:
        status = item.status(details=details)
        # A value due for refresh (before its ttl ends) is refreshed as a call would, warm or
        # not, so probes alone keep it alive; only warm= makes a value that is not there.
        if kick(item, app, make=warm):
            status = item.status(details=details)
        entry: dict[str, Any] = {"state": status.state}
        if status.stale:
            entry["stale"] = True
        serving = status.state in _SERVING
        if warm and not serving and _renewing(status):
            entry["renewing"] = serving = True
        if serving and "ping" in item.options:
            has, value = served(item)
            if has:
                loop_pings = pings.setdefault(current_loop(), {})
                error = await _pinged(item, value, loop_pings, ping_timeout, ping_every)
                entry["ping"] = "ok" if error is None else "failed"
                serving = error is None
                if details and error is not None:
                    entry.update(ping_error=error[0], ping_message=error[1])
        if details:
            entry.update(
                attempts=status.attempts,
                last_duration=status.last_duration,
                made_at=None if status.made_at is None else status.made_at.isoformat(),
                error=status.last_error_type,
                message=status.last_error_message,
            )
        entry["ok"] = serving
        return entry

    @router.get(path, include_in_schema=False)
    async def readiness(request: Request) -> JSONResponse:
        app = request.scope.get("app")
        overrides = getattr(app, "dependency_overrides", None) or {}
        report: dict[str, dict[str, Any]] = {}
        for item in items:
            if item in overrides:
                report[item.name] = {"state": "overridden", "ok": True}
            else:
                report[item.name] = await probe(item, app)
        oks = [entry.pop("ok") for entry in report.values()]  # from every entry
        ok = all(oks)
        body = {"status": "ready" if ok else "unavailable", "onces": report}
        if ok:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry_after)})

    return router


def _renewing(status: OnceStatus) -> bool:
    """An attempt is making a value again after the last one succeeded and then expired."""
    return (
        status.state == "running"
        and status.last_duration is not None
        and status.last_error_type is None
    )


def kick(target: Once[Any, Any], context: object, *, make: bool = True) -> bool:
    """Start making an unkeyed once's value in the background unless it is there or on its way.

    With ``make=False``, start only a refresh that is due before the value's ttl ends: a value
    there is kept alive, none is made. Returns whether an attempt was started. For readiness
    probes: nothing waits.
    """
    if target.process_scope and not in_process_loop():
        return run_in_process_loop(lambda: kick(target, context, make=make))
    now = _clock.monotonic()
    rec = target.store_here().record(NOKEY, now)
    if not rec.begins(now):  # the calls' own start rule
        return False
    made = rec.made
    if not make and (  # past the ttl a value is made anew, not refreshed
        rec.state not in CAN_REFRESH
        or made is None
        or (made.expires_at is not None and now >= made.expires_at)
    ):
        return False
    try:
        rec.start((), {}, target.bind(context))
    except OnceClosedError:
        return False
    return True


def served(target: Once[Any, Any]) -> tuple[bool, Any]:
    """Whether an unkeyed once serves a value in the running loop now, and that value."""
    store = target.store_seen()
    rec = None if store is None else store.records.get(NOKEY)
    if rec is None or rec.made is None or rec.due(_clock.monotonic()) not in SERVING:
        return False, None
    return True, rec.made.value
