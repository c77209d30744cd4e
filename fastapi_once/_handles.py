"""What the library does to a once from outside its calls: warm-up kicks, probes, test pins,
a lifespan's process-scope shutdown, and forgetting keys another process reset.

Each reaches a once's store through ``Once.store_here()``/``store_seen()``; a process-scope
once's store is touched in the process scope's loop only, so these hop there first.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeVar, cast

import anyio

from . import _core
from ._core import Once, registry
from ._errors import OnceClosedError
from ._keys import NOKEY, shared_key_digest
from ._logs import error_type, fields
from ._loops import current_loop, drain, hop, in_process_loop, run_in_process_loop
from ._records import IDLE, READY, REFRESHING, KeyView, Record
from ._tasks import spawn
from ._values import Value

T = TypeVar("T")

logger = logging.getLogger("fastapi_once")


def _unkeyed(target: Once[Any, Any]) -> Record | None:
    store = target.store_seen()
    return None if store is None else store.records.get(NOKEY)


async def retire_process_values(target: Once[Any, Any], timeout: float) -> None:  # noqa: ASYNC109
    """A lifespan's shutdown of a process-scope once: clean up its values in this process only.

    Unlike ``reset()`` it leaves an ``across=`` backend's record (other processes keep theirs),
    and it waits at most ``timeout`` seconds for work in flight, which then cleans up what it
    makes as soon as it settles (logged, as a loop's shutdown does).
    """
    if not in_process_loop():
        return await hop(lambda: retire_process_values(target, timeout))
    store = target.store_seen()
    if store is None:
        return
    with anyio.CancelScope(shield=True):
        left = await drain(lambda: [store], f"{target.name}: shutdown", max(timeout, 0.0))
    if left:
        logger.warning(
            "shutdown stopped waiting after %.1f s; still running: %s",
            timeout,
            ", ".join(attempt.label for attempt in left),
            extra=fields(target.name, "shutdown_timeout", duration_s=timeout),
        )


def kick(target: Once[Any, Any], context: object, *, make: bool = True) -> bool:
    """Start making an unkeyed once's value in the background unless it is there or on its way.

    With ``make=False``, start only a refresh that is due before the value's ttl ends: a value
    there is kept alive, none is made. Returns whether an attempt was started. For readiness
    probes: nothing waits.
    """
    if target.process_scope and not in_process_loop():
        return run_in_process_loop(lambda: kick(target, context, make=make))
    now = _core.monotonic()
    rec = target.store_here().record(NOKEY, now)
    refresh = rec.state == READY and rec.refresh_due(now)
    if refresh and not make:  # past the ttl a value is made anew, not refreshed
        ends = cast(Value, rec.made).expires_at
        refresh = ends is None or now < ends
    if not (refresh or (make and rec.state == IDLE)):
        return False
    try:
        rec.start((), {}, target.bind(context))
    except OnceClosedError:
        return False
    return True


def served(target: Once[Any, Any]) -> tuple[bool, Any]:
    """Whether an unkeyed once serves a value in the running loop now, and that value."""
    rec = _unkeyed(target)
    if rec is None or rec.made is None or rec.due(_core.monotonic()) not in (READY, REFRESHING):
        return False, None
    return True, rec.made.value


def pin(target: Once[Any, T], value: T) -> None:
    """Serve ``value`` from an unkeyed once in the running loop until :func:`unpin` (tests)."""
    if target.process_scope and not in_process_loop():
        return run_in_process_loop(lambda: pin(target, value))
    now = _core.monotonic()
    target.store_here().record(NOKEY, now).pin(
        Value(target.name, value, None, now, time.time(), (None, None))
    )


def unpin(target: Once[Any, T], value: T) -> None:
    """Stop serving a pinned ``value`` (nothing is cleaned up: it belongs to the caller)."""
    if target.process_scope and not in_process_loop():
        return run_in_process_loop(lambda: unpin(target, value))
    rec = _unkeyed(target)
    if rec is not None:
        rec.unpin(value)


def forget_elsewhere(name: str, digest: str | None) -> None:
    """What a backend's listener calls when another process reset once ``name``: forget it here.

    The forgetting (:func:`forget_shared`) runs in a task of its own, not in the listener's:
    it awaits the key's work in flight here, which may itself wait for a wake-up only the
    listener can deliver. Never raises; a failing cleanup is logged.
    """

    async def forget() -> None:
        try:
            await forget_shared(name, digest)
        except Exception as exc:
            kind = error_type(exc)
            logger.warning(
                "%s: a cleanup failed after a reset elsewhere: %s",
                name,
                kind,
                extra=fields(name, "cleanup_failed", error_type=kind),
            )

    spawn(current_loop(), forget(), "fastapi_once: reset from elsewhere")


async def forget_shared(name: str, digest: str | None) -> None:
    """Forget, in the running loop only, the across values another process reset.

    Every once named ``name`` retires (and cleans up) its value(s): a keyed once its value for
    the key whose shared digest is ``digest``, or every value if None; an unkeyed once its one
    value. The backend's record is already gone.
    """
    for target in [o for o in registry() if o.name == name]:
        store = target.store_seen()
        if store is None:
            continue
        views = [
            KeyView(store, key)
            for key in list(store.records)
            if digest is None or (target.keyed and _shared_digest(name, key) == digest)
        ]
        if views:
            await drain(lambda views=views: views, f"{name}.reset()")  # type: ignore[misc]


def _shared_digest(name: str, key: object) -> str | None:
    try:
        return shared_key_digest(name, key)
    except TypeError:  # a key no backend was given
        return None
