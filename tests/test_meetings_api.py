"""Where stale_if_error=, methods, jitter= and per-key reset meet the other options."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceTimeoutError, once

pytestmark = pytest.mark.anyio


async def test_a_timed_out_attempt_still_running_past_the_window_gives_no_retired_value(
    clock: FakeClock,
) -> None:
    """timeout=: once the window has ended, a call joining the hung attempt gets the timeout,
    not the stale value that was retired (and cleaned up) at the window's end."""
    gate = anyio.Event()
    runs: list[int] = []
    closed: list[int] = []

    async def make() -> AsyncIterator[int]:
        runs.append(len(runs) + 1)
        mine = len(runs)
        if mine > 1:
            with anyio.CancelScope(shield=True):  # ignores the timeout's cancellation
                await gate.wait()
            raise ConnectionError("down")
        yield mine
        closed.append(mine)

    get = once(make, ttl=10, stale_if_error=30, timeout=0.05)
    assert await get() == 1
    clock.advance(11)
    assert await get() == 1  # run 2 timed out within the window: the stale value
    clock.advance(30)  # the window is over; run 2 still hangs
    try:
        with pytest.raises(OnceTimeoutError):
            await get()
        await wait_until(lambda: closed == [1])
    finally:
        gate.set()
    await wait_until(lambda: get.status().state != "running")
