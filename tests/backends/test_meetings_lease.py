"""Where the cross-process features meet: listener cancellations, stores closed at shutdown."""

from __future__ import annotations

import asyncio

import pytest
from test_listener_shutdown import ENDS_WITHIN, run_in_a_thread

from fastapi_once.backends._wakeups import Listeners, Wakeups


def test_a_timeout_whose_unwinding_awaits_does_not_end_the_listener() -> None:
    """A driver's timeout that awaits on its way out (a cleanup in a ``finally`` inside the
    timeout block) takes its cancellation back a step later than a plain one: the listener goes
    on, and a later stop() ends it."""
    timeouts = 0
    five = asyncio.Event()

    async def listen(wakeups: Wakeups) -> None:
        nonlocal timeouts
        wakeups.listening.set()
        while True:
            try:
                async with asyncio.timeout(0.01):
                    try:
                        await asyncio.sleep(3600)
                    finally:
                        await asyncio.sleep(0)  # the driver's cleanup, one loop turn
                        await asyncio.sleep(0.05)  # and one that waits on the network
            except TimeoutError:
                timeouts += 1
                if timeouts == 5:
                    five.set()

    async def main() -> None:
        listeners = Listeners(listen)
        listeners.start()
        await asyncio.wait_for(five.wait(), 30)
        assert asyncio.get_running_loop() in listeners
        await asyncio.wait_for(listeners.stop(), ENDS_WITHIN)

    if not hasattr(asyncio, "timeout"):  # Python 3.10
        pytest.skip("asyncio.timeout is Python 3.11+")
    run_in_a_thread(main)
    assert timeouts >= 5


def test_a_native_cancellation_in_a_running_loop_that_the_driver_loses_still_ends_it() -> None:
    """Cancelled natively while the loop runs (as code that cancels every task does), the
    listener loses the cancellation once and goes on: it still ends, without stop()."""
    from test_listener_shutdown import swallowing_once

    async def listen(wakeups: Wakeups) -> None:
        wakeups.listening.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        listeners = Listeners(swallowing_once(listen))
        wakeups = listeners.start()
        await wakeups.listening.wait()
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "fastapi_once listener"]
        task.cancel()
        await asyncio.wait_for(asyncio.wait([task]), ENDS_WITHIN)
        assert task.cancelled()

    if not hasattr(asyncio.Task, "cancelling"):  # Python 3.10 counts no cancellations
        pytest.skip("Task.cancelling() is Python 3.11+")
    run_in_a_thread(main)
