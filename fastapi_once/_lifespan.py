"""once_lifespan: warm chosen onces before the app serves, clean up every value at shutdown."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._core import Once, make_with
from ._errors import OnceClosedError
from ._fastapi import once
from ._grace import check_grace
from ._handles import retire_process_values
from ._loops import close, current_loop, state_of
from ._methods import refuse_class_level
from ._options import lifespan_options
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
    :class:`OnceClosedError` (answered 503 with ``Retry-After`` by
    :func:`fastapi_once.once_closed_handler`, which startup installs on the app unless it has a
    handler of its own for that error), work in flight is awaited, and every value made in the
    loop, lazily or at startup, is cleaned up exactly once and forgotten: the next lifespan
    starts fresh. Last, the ``across=`` backends that onces built in this loop from a URL or a
    factory are closed (their listeners and connections); backend objects the app made are its
    own to close. A startup that fails or is cancelled half-way cleans up what it made
    (shielded).

    Args:
        *onces: onces (or functions, taken as ``once(fn)``) to make before the app serves.
        lifespan: the app's own lifespan, wrapped inside this one.
        shutdown_timeout: seconds shutdown waits for work in flight and cleanups (default 10);
            what still runs then is logged. The server runs the lifespan's shutdown after its
            own grace period for open connections (uvicorn's ``--timeout-graceful-shutdown``),
            so the process exits about the sum of the two after SIGTERM: keep it within the
            orchestrator's grace period (Kubernetes: 30 s by default, minus any preStop sleep).
            Under uvicorn, a ``shutdown_timeout`` longer than its grace period is logged at
            startup.
        reset_process_scope: also clean up, at shutdown, the values of the ``scope="process"``
            onces among ``onces`` (within ``shutdown_timeout``, in this process only: an
            ``across=`` backend's record is left). Off by default: their values outlive the app
            (other event loops of the process may use them) and are cleaned up at interpreter
            exit.

    Raises:
        TypeError: an item is the app (``FastAPI(lifespan=once_lifespan)``: call it), is not
            callable, is keyed (a keyed once has no single value), or is a once method looked up
            on its class (pass an instance's: ``obj.method``); ``lifespan`` is not callable;
            ``shutdown_timeout`` is not a number (a bool is not); ``reset_process_scope`` is not
            a bool.
        ValueError: ``shutdown_timeout`` is not a positive, finite number of seconds.
        Exception: at startup, the original exception of the first once that failed (what the
            others made is cleaned up first).
    """
    shutdown_timeout = lifespan_options(lifespan, shutdown_timeout, reset_process_scope)
    warm: list[Once[Any, Any]] = []
    for item in onces:
        if isinstance(item, Starlette):
            # FastAPI(lifespan=once_lifespan): the server calls it with the app at startup.
            raise TypeError(
                "once_lifespan was given the app, so it was passed uncalled "
                "(FastAPI(lifespan=once_lifespan)); call it: "
                "FastAPI(lifespan=once_lifespan(...)), listing the onces to warm, "
                "e.g. once_lifespan(load_model), or none: once_lifespan()"
            )
        made = once(item)
        refuse_class_level(made, "once_lifespan")
        if made.keyed:
            raise TypeError(
                f"once_lifespan({made.name}): a keyed once has one value per key, so there is "
                "nothing to warm; list only unkeyed onces"
            )
        warm.append(made)

    # The process-scope onces this lifespan resets at shutdown: none unless asked.
    process_scope = [o for o in warm if reset_process_scope and o.options.get("scope") == "process"]

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        state_of(current_loop()).closed = False
        install_closed_handler(app)
        check_grace(shutdown_timeout)
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


# --- requests after shutdown began ----------------------------------------------------------------

#: Seconds a client is told to wait (``Retry-After``) before retrying a request refused at shutdown.
RETRY_AFTER = 1


async def once_closed_handler(request: Request, exc: Exception) -> Response:
    """Answer a request refused at shutdown (:class:`OnceClosedError`): 503 with ``Retry-After``.

    ``once_lifespan`` installs it when the app has no handler of its own for
    :class:`OnceClosedError` (or for ``OnceError``); register yours to replace it::

        app.add_exception_handler(OnceClosedError, my_handler)

    The body names no once and carries no exception text.
    """
    return JSONResponse(
        {"detail": "the service is shutting down; retry the request"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


def install_closed_handler(app: Any) -> None:
    """Add :func:`once_closed_handler` to ``app`` unless it handles ``OnceClosedError`` itself."""
    handlers = getattr(app, "exception_handlers", None)
    if not isinstance(handlers, dict):
        return
    for key in handlers:
        # A handler of the app for OnceClosedError or a base of it (Exception, the 500 page, aside).
        if isinstance(key, type) and key is not Exception and issubclass(OnceClosedError, key):
            return
    handlers[OnceClosedError] = once_closed_handler
    # The server builds the middleware stack before it runs the lifespan: add the handler to the
    # stack's ExceptionMiddleware too. A middleware that hides the next app (no ``.app``) stops
    # the search; the handler then applies from the next build of the stack.
    layer = getattr(app, "middleware_stack", None)
    for _ in range(100):
        if layer is None:
            return
        if isinstance(layer, ExceptionMiddleware):
            layer.add_exception_handler(OnceClosedError, once_closed_handler)
            return
        layer = getattr(layer, "app", None)
