"""Time in tests: a clock that moves only when told to, and polling for library-side work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until(check: Callable[[], Awaitable[bool] | bool]) -> None:
    """Poll ``check`` until it is true: for work the library does in its own tasks."""
    with anyio.fail_after(5):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(0.001)
