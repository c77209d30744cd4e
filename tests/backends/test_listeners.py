"""Listeners: a backend's listener task per event loop, and how it is stopped.

The Redis and PostgreSQL backends run their keyed listener through it; these tests give it
listen functions that behave as a driver may (swallowing a cancellation, taking a while to
close), which a real server cannot be made to do on cue.
"""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from fastapi_once.backends._wakeups import Listeners, Wakeups

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the backends that listen are asyncio-only


async def test_stop_ends_a_listener_that_swallows_a_cancellation() -> None:
    """A driver read may swallow the CancelledError meant for it and read on (as redis-py did
    when a server restart met a read's own timeout): stop() cancels again until the task has
    ended, so neither it nor the event loop's shutdown waits forever."""
    swallowed = 0

    async def listen(wakeups: Wakeups) -> None:
        nonlocal swallowed
        wakeups.listening.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed == 3:
                    raise
                swallowed += 1
                # Python 3.11+ counts cancellations: a swallowing driver takes its count back.
                uncancel = getattr(asyncio.current_task(), "uncancel", None)
                if uncancel is not None:
                    uncancel()

    listeners = Listeners(listen)
    wakeups = listeners.start()
    await wakeups.listening.wait()
    with anyio.fail_after(10):
        await listeners.stop()
    assert swallowed == 3
    assert asyncio.get_running_loop() not in listeners
    assert [t for t in asyncio.all_tasks() if t.get_name() == "fastapi_once listener"] == []


async def test_stop_does_not_swallow_the_callers_own_cancellation() -> None:
    """A caller cancelled while stop() waits for a listener that takes a while to end is
    cancelled: stop() does not go on as if the cancellation were the listener's."""
    closing, closed = anyio.Event(), anyio.Event()
    release = anyio.Event()

    async def listen(wakeups: Wakeups) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):  # closing a connection, say
                closing.set()
                await release.wait()
                closed.set()

    listeners = Listeners(listen)
    listeners.start()
    await anyio.lowlevel.checkpoint()  # the listener is waiting
    after_stop = False
    with anyio.fail_after(10):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_once_closing() -> None:
                    await closing.wait()
                    scope.cancel()

                tg.start_soon(cancel_once_closing)
                await listeners.stop()
                after_stop = True
        assert scope.cancelled_caught
        assert not after_stop
        release.set()
        await closed.wait()


async def test_a_listener_started_while_the_old_one_ends_is_kept() -> None:
    """stop() takes the loop's listener at once; one started while the old one is still
    ending stays registered after the old one ends (and is the one the next stop() ends)."""
    release = anyio.Event()
    started: list[Wakeups] = []

    async def listen(wakeups: Wakeups) -> None:
        started.append(wakeups)
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await release.wait()

    listeners = Listeners(listen)
    loop = asyncio.get_running_loop()
    first = listeners.start()
    await anyio.lowlevel.checkpoint()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listeners.stop)
            await anyio.lowlevel.checkpoint()
            assert loop not in listeners
            second = listeners.start()
            assert second is not first
            release.set()
        await anyio.lowlevel.checkpoint()  # the old listener's end has been handled
        assert loop in listeners
        assert listeners.start() is second
        await listeners.stop()
    assert loop not in listeners
    assert started == [first, second]


async def test_followers_are_woken_when_their_listener_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listener that ends on its own (an unexpected error) wakes its followers, so they
    check on their own; the error is logged by type, without its message; the next start()
    begins a new listener."""
    fail = anyio.Event()

    async def listen(wakeups: Wakeups) -> None:
        await fail.wait()
        raise RuntimeError("the driver broke on postgresql://u:secret@db")

    listeners = Listeners(listen)
    wakeups = listeners.start()
    with wakeups.waiter("record") as woken:
        fail.set()
        with anyio.fail_after(10):
            await woken.wait()
        await anyio.lowlevel.checkpoint()
    assert asyncio.get_running_loop() not in listeners
    assert [r.getMessage() for r in caplog.records] == [
        "the keyed listener failed with RuntimeError"
    ]
    assert listeners.start() is not wakeups
    await listeners.stop()
