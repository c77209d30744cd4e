"""A value maker for the tests of a value's life: runs that fail on demand, wait on a gate, and
record their cleanups."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio


class Source:
    """An async generator function's stand-in whose runs fail on demand, may wait on a gate, and
    record cleanups.

    Args:
        deaf: a run waiting on the gate ignores cancellation (a run that times out goes on).
    """

    def __init__(self, *, deaf: bool = False) -> None:
        self.deaf = deaf
        self.runs = 0
        self.failing = False
        self.gate: anyio.Event | None = None
        self.in_flight = 0
        self.most = 0
        self.closed: list[int] = []

    async def make(self) -> AsyncIterator[int]:
        """Make the next run's number (failing with ``ConnectionError`` while ``failing``)."""
        self.runs += 1
        mine = self.runs
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if self.gate is not None:
                with anyio.CancelScope(shield=self.deaf):
                    await self.gate.wait()
            if self.failing:
                raise ConnectionError(f"run {mine} failed")
        finally:
            self.in_flight -= 1
        yield mine
        self.closed.append(mine)
