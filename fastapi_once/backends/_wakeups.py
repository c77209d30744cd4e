"""Wakeups and Listeners: one event loop's keyed followers, and the listener that wakes them.

A backend keeps one listener connection per event loop that receives every keyed
notification (a leader's success or failure); followers do not hold a connection while they
wait, they register here and are woken by record.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, NamedTuple

import anyio

from .._logs import error_type, fields

logger = logging.getLogger("fastapi_once")

# Keyed reads one event loop runs at once, each on a connection borrowed for the read only:
# followers woken together share a few connections rather than opening one each.
READS_AT_ONCE = 8


class Wakeups:
    """The followers of one event loop waiting on keyed records, by record.

    Only the loop's own thread touches it (the listener task and the followers all run on that
    loop), so it needs no lock.
    """

    def __init__(self) -> None:
        # record name -> the events of the followers waiting on it
        self._waiting: dict[str, set[asyncio.Event]] = {}
        # Set while the listener is subscribed: a notification sent after a follower saw it
        # set reaches the follower (or, if the listener reconnects meanwhile, wake_all does).
        self.listening = asyncio.Event()
        # Bounds the loop's keyed reads in flight (see READS_AT_ONCE).
        self.gate = asyncio.Semaphore(READS_AT_ONCE)
        # Set once the listener has ended (aclose, or it failed): nobody wakes these followers
        # any more, so a follower still waiting registers with the loop's next listener.
        self.ended = False

    @contextlib.contextmanager
    def waiter(self, record: str) -> Iterator[asyncio.Event]:
        """Register a follower of ``record`` for the block; its event is set when woken."""
        event = asyncio.Event()
        self._waiting.setdefault(record, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiting.get(record)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[record]

    def wake(self, record: str) -> None:
        """Wake every follower of ``record`` (its leader has ended)."""
        for event in self._waiting.get(record, ()):
            event.set()

    def wake_all(self) -> None:
        """Wake every follower, to check again (the listener may have missed notifications)."""
        for events in self._waiting.values():
            for event in events:
                event.set()

    def waiting(self) -> int:
        """How many followers wait."""
        return sum(len(events) for events in self._waiting.values())

    async def until_listening(self, longest: float) -> None:
        """Return once the listener is subscribed, or after ``longest`` seconds (it may be
        reconnecting: followers then rely on their recheck interval)."""
        if not self.listening.is_set():
            with anyio.move_on_after(longest):
                await self.listening.wait()

    @staticmethod
    async def woken(event: asyncio.Event, longest: float) -> None:
        """Return when ``event`` is set, or after ``longest`` seconds."""
        with anyio.move_on_after(longest):
            await event.wait()


class _Running(NamedTuple):
    task: asyncio.Task[None]
    scope: anyio.CancelScope
    wakeups: Wakeups


class ListenerTask(asyncio.Task[None]):
    """A listener's task: a native cancellation of it also cancels its anyio scope.

    The event loop's shutdown (``asyncio.run()`` ending, with or without the backend's
    ``aclose()``) cancels every task once, natively. A driver may swallow that one
    ``CancelledError`` (``asyncio.wait_for`` on Python 3.11 returns a result that finished in
    the same turn and drops the cancellation: CPython gh-86296), and a listener is a loop that
    never returns on its own, so the shutdown would wait forever. Cancelling the scope makes
    anyio deliver the cancellation again at every await until the task has left it.

    Timeouts inside the driver also cancel the task natively, and take it back
    (``uncancel()``) as they turn it into their ``TimeoutError``, before the task next waits.
    So a cancellation counts as the task's end only if, after the task's next step, it still
    stands: the loop was not running when it came (only code outside the loop, i.e. its
    shutdown, cancels then), or, where Python counts cancellations (3.11+), nobody took it back.
    """

    def __init__(self, coro: Coroutine[Any, Any, None], scope: anyio.CancelScope) -> None:
        super().__init__(coro, name="fastapi_once listener")
        self._scope = scope

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the task (see the class docstring for when the scope is cancelled too)."""
        cancelled = super().cancel(msg)
        if cancelled:
            loop = self.get_loop()
            # call_soon: the loop may be stopping, and the scope is cancelled in the loop. The
            # task's own step (woken by this cancellation) is queued before this callback.
            loop.call_soon(self._confirm, not loop.is_running())
        return cancelled

    def _confirm(self, from_outside: bool) -> None:
        if self.done():
            return
        cancelling = getattr(self, "cancelling", None)  # Python 3.11+
        if from_outside or (cancelling is not None and cancelling() > 0):
            self._scope.cancel()


class Listeners:
    """A backend's listener task per event loop, started on first use, and its followers.

    ``listen(wakeups)`` runs until cancelled (it reconnects on its own). It is stopped through
    an anyio cancel scope: the cancellation is delivered again at every await until the task
    has left the scope, so a driver that swallows one ``CancelledError`` (redis-py can, when a
    read's own timeout meets it) cannot keep the listener, and :meth:`stop`, waiting. The same
    holds when the event loop's shutdown cancels the task natively (see :class:`ListenerTask`):
    a loop that ends without :meth:`stop` does not wait on its listener either.
    """

    def __init__(self, listen: Callable[[Wakeups], Awaitable[None]]) -> None:
        self._listen = listen
        # Per event loop, its listener; only the loop's own thread touches its entry. The
        # entry leaves when the task ends (or stop() takes it), so a closed loop's is gone.
        self._running: dict[asyncio.AbstractEventLoop, _Running] = {}

    def __contains__(self, loop: asyncio.AbstractEventLoop) -> bool:
        return loop in self._running

    def start(self) -> Wakeups:
        """Start the running loop's listener unless it runs; return the loop's followers."""
        loop = asyncio.get_running_loop()
        running = self._running.get(loop)
        if running is not None:
            return running.wakeups
        wakeups, scope = Wakeups(), anyio.CancelScope()

        async def listen() -> None:
            with scope:
                await self._listen(wakeups)

        # In an empty context: not the caller's attempt (its wait-for edges), nor its trace.
        task = contextvars.Context().run(ListenerTask, listen(), scope)
        entry = self._running[loop] = _Running(task, scope, wakeups)

        def ended(_: object) -> None:
            if self._running.get(loop) is entry:  # not a listener started after stop()
                del self._running[loop]
            wakeups.ended = True
            wakeups.listening.clear()
            wakeups.wake_all()  # they check again, and wait on the next listener
            if not task.cancelled() and (exc := task.exception()) is not None:
                # The type only: a driver's message may hold a DSN. The next keyed call
                # starts another listener.
                kind = error_type(exc)
                logger.error(
                    "the keyed listener failed with %s",
                    kind,
                    extra=fields(None, "listener_failed", error_type=kind),
                )

        task.add_done_callback(ended)
        return wakeups

    async def stop(self) -> None:
        """Stop the running loop's listener and wait until it has ended (a later call starts
        another). A cancellation of the caller is not swallowed."""
        running = self._running.pop(asyncio.get_running_loop(), None)
        if running is not None:
            running.scope.cancel()
            await asyncio.wait([running.task])
