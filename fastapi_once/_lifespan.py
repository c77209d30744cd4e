"""once_lifespan: warm chosen onces before the app serves, clean up every value at shutdown."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from ._core import Once, reset_all
from ._fastapi import once

logger = logging.getLogger("fastapi_once")

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def once_lifespan(*onces: Callable[..., Any], lifespan: Lifespan | None = None) -> Lifespan:
    """Return a FastAPI lifespan that warms ``onces`` at startup and cleans up at shutdown.

    Startup makes the values of ``onces`` concurrently (onces that depend on each other wait for
    each other through single-flight), skipping any that ``app.dependency_overrides`` replaces,
    then enters ``lifespan`` (its state still reaches ``request.state``). Shutdown exits
    ``lifespan``, then runs the cleanup of every value made in this event loop, lazily or at
    startup, exactly once and newest first, and forgets them: the next lifespan starts fresh.

    Args:
        *onces: onces (or functions, taken as ``once(fn)``) to make before the app serves.
        lifespan: the app's own lifespan, wrapped inside this one.

    Raises:
        TypeError: an item is not callable, or is keyed (a keyed once has no single value).
        Exception: at startup, the original exception of the first once that failed (what the
            others made is cleaned up first).
    """
    warm: list[Once[Any, Any]] = []
    for item in onces:
        made = once(item)
        if made.keyed:
            raise TypeError(
                f"once_lifespan({made.name}): a keyed once has one value per key, so there is "
                "nothing to warm; list only unkeyed onces"
            )
        warm.append(made)

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        try:
            await _warm(app, warm)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            await reset_all()

    return run


async def _warm(app: Any, onces: list[Once[Any, Any]]) -> None:
    overrides = getattr(app, "dependency_overrides", None) or {}
    todo = [item for item in onces if item not in overrides]
    failures: list[Exception] = []
    ready = 0

    async def make(item: Once[Any, Any], scope: anyio.CancelScope) -> None:
        nonlocal ready
        started = time.monotonic()
        try:
            await item._get(app)
        except Exception as exc:
            logger.error("warming %s failed with %s", item.name, type(exc).__name__)
            failures.append(exc)
            scope.cancel()
            return
        ready += 1
        took = time.monotonic() - started
        logger.info("warming %d/%d: %s ready in %.2f s", ready, len(todo), item.name, took)

    if todo:
        logger.info("warming %d once(s): %s", len(todo), ", ".join(item.name for item in todo))
    async with anyio.create_task_group() as group:
        for item in todo:
            group.start_soon(make, item, group.cancel_scope)
    if failures:
        raise failures[0]
