"""Shared fixtures: every anyio test runs on asyncio and on trio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each ``@pytest.mark.anyio`` test on both backends."""
    return str(request.param)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the clock of expiry, refresh and cooldown with one the test moves."""
    from fastapi_once import _core

    fake = FakeClock()
    monkeypatch.setattr(_core, "monotonic", fake)
    return fake


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
