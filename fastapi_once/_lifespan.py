"""once_lifespan: warm chosen onces before the app serves, clean up every value at shutdown."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ._core import Once, make_with
from ._fastapi import once
from ._handles import retire_process_values
from ._loops import close, current_loop, state_of
from ._methods import refuse_class_level
from ._telemetry import error_type, fields
from .backends._late import close_built

logger = logging.getLogger("fastapi_once")

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def once_lifespan(
    *onces: Callable[..., Any],
    lifespan: Lifespan | None = None,
    shutdown_timeout: float = 10.0,
    reset_process_scope: bool = False,
) -> Lifespan:
    """Return a FastAPI lifespan that warms ``onces`` at startup and cleans up at shutdown.

    Startup makes the values of ``onces`` concurrently (onces that depend on each other wait for
    each other through single-flight), skipping any that ``app.dependency_overrides`` replaces,
    then enters ``lifespan`` (its state still reaches ``request.state``). Shutdown exits
    ``lifespan``, then closes this event loop's onces: new attempts are refused with
    :class:`OnceClosedError`, work in flight is awaited, and every value made in the loop, lazily
    or at startup, is cleaned up exactly once and forgotten: the next lifespan starts fresh.
    Last, the ``across=`` backends that onces built in this loop from a URL or a factory are
    closed (their listeners and connections); backend objects the app made are its own to
    close. A startup that fails or is cancelled half-way cleans up what it made (shielded).

    Args:
        *onces: onces (or functions, taken as ``once(fn)``) to make before the app serves.
        lifespan: the app's own lifespan, wrapped inside this one.
        shutdown_timeout: seconds shutdown waits for work in flight and cleanups, so that a
            hung function cannot hold the process past the server's grace period (default 10;
            Kubernetes gives a pod 30 s by default). What still runs then is logged.
        reset_process_scope: also clean up, at shutdown, the values of the ``scope="process"``
            onces among ``onces`` (within ``shutdown_timeout``, in this process only: an
            ``across=`` backend's record is left). Off by default: their values outlive the app
            (other event loops of the process may use them) and are cleaned up at interpreter
            exit.

    Raises:
        TypeError: an item is not callable, is keyed (a keyed once has no single value), or is a
            once method looked up on its class (pass an instance's: ``obj.method``).
        ValueError: ``shutdown_timeout`` is not a positive finite number.
        Exception: at startup, the original exception of the first once that failed (what the
            others made is cleaned up first).
    """
    warm: list[Once[Any, Any]] = []
    for item in onces:
        made = once(item)
        refuse_class_level(made, "once_lifespan")
        if made.keyed:
            raise TypeError(
                f"once_lifespan({made.name}): a keyed once has one value per key, so there is "
                "nothing to warm; list only unkeyed onces"
            )
        warm.append(made)
    if not (isinstance(shutdown_timeout, (int, float)) and 0 < shutdown_timeout < float("inf")):
        raise ValueError(
            f"once_lifespan(shutdown_timeout={shutdown_timeout!r}): give a positive, finite "
            "number of seconds"
        )

    # The process-scope onces this lifespan resets at shutdown: none unless asked.
    process_scope = [o for o in warm if reset_process_scope and o.options.get("scope") == "process"]

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        state_of(current_loop()).closed = False
        try:
            await _warm(app, warm)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        except BaseException:
            # The startup's (or the app's) own exception goes on: a cleanup that fails now is
            # logged by the cleanup, not raised in its place.
            with contextlib.suppress(Exception):
                await shut()
            raise
        await shut()

    async def shut() -> None:
        # One deadline for the whole shutdown, read on the caller's clock (trio's is its own).
        deadline = anyio.current_time() + shutdown_timeout
        await close(shutdown_timeout)
        with anyio.CancelScope(shield=True):
            for item in process_scope:
                await retire_process_values(item, deadline - anyio.current_time())
            # After the cleanups (an across= once's cleanup may still use its store).
            with anyio.move_on_after(max(deadline - anyio.current_time(), 1.0)):
                await close_built()

    return run


async def _warm(app: Any, onces: list[Once[Any, Any]]) -> None:
    overrides = getattr(app, "dependency_overrides", None) or {}
    todo = [item for item in onces if item not in overrides]
    failures: list[BaseException] = []
    cancelled = anyio.get_cancelled_exc_class()
    ready = 0

    async def make(item: Once[Any, Any], scope: anyio.CancelScope) -> None:
        nonlocal ready
        started = time.monotonic()
        try:
            await make_with(item, app)
        except cancelled:
            raise
        except BaseException as exc:
            # Caught here, raised after the group: KeyboardInterrupt or SystemExit reaches the
            # server as itself, not inside an exception group.
            kind, took = error_type(exc), time.monotonic() - started
            extra = fields(item.name, "warm_failed", duration_s=took, error_type=kind)
            logger.error("warming %s failed with %s", item.name, kind, extra=extra)
            failures.append(exc)
            scope.cancel()
            return
        ready += 1
        took = time.monotonic() - started
        extra = fields(item.name, "warm_ready", duration_s=took)
        logger.info(
            "warming %d/%d: %s ready in %.2f s", ready, len(todo), item.name, took, extra=extra
        )

    if todo:
        names = ", ".join(item.name for item in todo)
        logger.info("warming %d once(s): %s", len(todo), names, extra=fields(None, "warm_start"))
    async with anyio.create_task_group() as group:
        for item in todo:
            group.start_soon(make, item, group.cancel_scope)
    if failures:
        raise failures[0]
