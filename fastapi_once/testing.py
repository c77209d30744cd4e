"""Test helpers that need no test framework: ``override()``.

This module does not import pytest, so ``override()`` works in any test runner, a script or a
notebook. The ``once_reset`` fixture lives in :mod:`fastapi_once.pytest_plugin`, which pytest
loads by itself; ``fastapi_once.testing.once_reset``, its home in 0.1, still finds it with a
``DeprecationWarning`` until 0.3.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from ._core import Once
from ._handles import pin, unpin
from ._methods import refuse_class_level

T = TypeVar("T")

__all__ = ["override"]


@asynccontextmanager
async def override(target: Once[Any, T], value: T) -> AsyncIterator[T]:
    """Make ``await target()`` return ``value`` in the running event loop, inside the block.

    A ``scope="process"`` once returns it in every loop and thread (and from ``get_sync()``).

    For routes, prefer FastAPI's own ``app.dependency_overrides[target] = lambda: value``,
    which works across event loops. On exit the once forgets ``value`` (nothing is cleaned up:
    it is yours) and makes its own value on the next call.

    Raises:
        TypeError: ``target`` is keyed (override one key by overriding the route dependency), or
            is a once method looked up on its class (override an instance's: ``obj.method``).
    """
    refuse_class_level(target, "override")
    if target.keyed:
        raise TypeError(f"override({target.name}): a keyed once cannot be overridden as a whole")
    await target.reset()
    pin(target, value)
    try:
        yield value
    finally:
        unpin(target, value)


def __getattr__(name: str) -> Any:
    """Deprecated names: ``once_reset`` (moved to :mod:`fastapi_once.pytest_plugin` in 0.2)."""
    if name == "once_reset":
        warnings.warn(
            "fastapi_once.testing.once_reset is deprecated since 0.2 and will be removed in 0.3: "
            "the fixture lives in fastapi_once.pytest_plugin, which pytest loads by itself, so "
            "delete the import and ask for once_reset in the test's arguments",
            DeprecationWarning,
            stacklevel=2,
        )
        from .pytest_plugin import once_reset

        return once_reset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
