"""A crowd of concurrent callers, the shape of most single-flight tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def crowd(call: Callable[[], Awaitable[T]], size: int) -> list[T]:
    """Start ``size`` concurrent ``call()``s and return their results."""
    results: list[T] = []

    async def one() -> None:
        results.append(await call())

    async with anyio.create_task_group() as group:
        for _ in range(size):
            group.start_soon(one)
    return results
