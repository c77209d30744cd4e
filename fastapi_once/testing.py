"""Test helpers, also a pytest plugin: the ``once_reset`` fixture and ``override()``.

Installed with the package, pytest loads this module as a plugin (entry point ``fastapi_once``):
a test that asks for ``once_reset`` leaves no once values behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from ._core import Once, pin, unpin
from ._loops import forget_everything

T = TypeVar("T")

__all__ = ["once_reset", "override"]


@pytest.fixture
def once_reset() -> Iterator[None]:
    """After the test, forget every once's values in every event loop and run their cleanups.

    Cleanups run in a fresh event loop (the test's own has ended); their errors are logged,
    not raised. An app tested with ``with TestClient(app)`` and ``once_lifespan`` is already
    reset by its shutdown.
    """
    yield
    forget_everything()


@asynccontextmanager
async def override(target: Once[Any, T], value: T) -> AsyncIterator[T]:
    """Make ``await target()`` return ``value`` in the running event loop, inside the block.

    For routes, prefer FastAPI's own ``app.dependency_overrides[target] = lambda: value``,
    which works across event loops. On exit the once forgets ``value`` (nothing is cleaned up:
    it is yours) and makes its own value on the next call.

    Raises:
        TypeError: ``target`` is keyed (override one key by overriding the route dependency).
    """
    if target.keyed:
        raise TypeError(f"override({target.name}): a keyed once cannot be overridden as a whole")
    await target.reset()
    pin(target, value)
    try:
        yield value
    finally:
        unpin(target, value)
