"""Wakeups and Listeners: one event loop's waiting followers, and the listener that wakes them.

A store keeps one listener per event loop that hears every record's end and every reset;
followers hold no connection while they wait: they register here and are woken by record.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio

from .._logs import error_type, fields
from ._store import Heard, Reset, Watch

logger = logging.getLogger("fastapi_once")


class Wakeups:
    """The followers of one event loop waiting on records, by record.

    Only the loop's own thread touches it (the listener task and the followers all run on that
    loop), so it needs no lock.
    """

    def __init__(self) -> None:
        # record name -> the events of the followers waiting on it
        self._waiting: dict[str, set[asyncio.Event]] = {}
        # Set while the listener is subscribed: a notification sent after a follower saw it
        # set reaches the follower (or, if the listener reconnects meanwhile, wake_all does).
        self.listening = asyncio.Event()
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
        finally:  # the set stays while it holds this event: only this block takes it out
            events = self._waiting[record]
            events.discard(event)
            if not events:
                del self._waiting[record]

    def wake(self, record: str) -> None:
        """Wake every follower of ``record`` (its leader has ended, or it was reset)."""
        for event in self._waiting.get(record, ()):
            event.set()

    def wake_all(self) -> None:
        """Wake every follower, to check again (the listener may have missed notifications)."""
        for record in self._waiting:
            self.wake(record)

    def announced(self, message: str, record: Callable[[str, str], str], heard: Heard) -> None:
        """For a reset ``message`` (see :meth:`Reset.from_json`; anything else is ignored), wake
        the followers of its ``record(name, key)`` (every follower, for every key), then hand
        it to ``heard``."""
        reset = Reset.from_json(message)
        if reset is not None:
            self.announce(reset, record, heard)

    def announce(self, reset: Reset, record: Callable[[str, str], str], heard: Heard) -> None:
        """Wake the followers of ``reset``'s ``record(name, key)`` (every follower, for every
        key), then hand it to ``heard``."""
        if reset.key is None:
            self.wake_all()
        else:
            self.wake(record(reset.name, reset.key))
        heard(reset)

    def waiting(self) -> int:
        """How many followers wait."""
        return sum(len(events) for events in self._waiting.values())

    async def until_listening(self, longest: float) -> None:
        """Return once the listener is subscribed, or after ``longest`` seconds (it may be
        reconnecting: followers then rely on their recheck interval)."""
        with anyio.move_on_after(longest):
            await self.listening.wait()


class ListenerWatch(Watch):
    """A store's watch of one record, registered with its loop's listener for the block.

    After the listener ended (``aclose()``), the next :meth:`changed` registers with the loop's
    next listener and returns at once: changes may have been missed meanwhile.
    """

    def __init__(self, listeners: Listeners, record: str) -> None:
        self._listeners = listeners
        self._record = record
        self._registered = contextlib.ExitStack()
        self._register()

    def _register(self) -> None:
        self._registered.close()
        self.wakeups = self._listeners.start()
        self._event = self._registered.enter_context(self.wakeups.waiter(self._record))

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 - the protocol's
        """See :meth:`Watch.changed`."""
        if self.wakeups.ended:
            self._register()
            return
        with anyio.move_on_after(timeout):
            await self._event.wait()
        self._event.clear()

    def __enter__(self) -> ListenerWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._registered.close()


# Seconds a native cancellation of a listener may stand, while the loop runs, before it counts
# as the task's end (a driver's timeout takes its own back as it unwinds), and how often that is
# checked after the first check, one loop turn after the cancellation.
TAKE_BACK_WITHIN = 1.0
CONFIRM_EVERY = 0.05


class ListenerTask(asyncio.Task[None]):
    """A listener's task: a native cancellation of it also cancels its anyio scope.

    The event loop's shutdown (``asyncio.run()`` ending, with or without ``aclose()``) cancels
    every task once, natively. A driver may swallow that one ``CancelledError``
    (``asyncio.wait_for`` on Python 3.11 drops it for a result that finished in the same turn:
    CPython gh-86296), and a listener never returns on its own, so the shutdown would wait
    forever. Cancelling the scope makes anyio deliver the cancellation again at every await
    until the task has left it.

    A driver's own timeouts also cancel the task natively and take that back (``uncancel()``),
    maybe some loop turns later. So a cancellation counts as the task's end if the loop was not
    running when it came (only its shutdown cancels then), or, where Python counts
    cancellations (3.11+), if nobody took it back within :data:`TAKE_BACK_WITHIN` seconds.
    """

    def __init__(self, listen: Callable[[Wakeups], Awaitable[None]], wakeups: Wakeups) -> None:
        self.scope = anyio.CancelScope()
        self.wakeups = wakeups  # the followers this listener wakes
        super().__init__(self._listen(listen), name="fastapi_once listener")

    async def _listen(self, listen: Callable[[Wakeups], Awaitable[None]]) -> None:
        with self.scope:
            await listen(self.wakeups)

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the task (see the class docstring for when the scope is cancelled too)."""
        cancelled = super().cancel(msg)
        if cancelled:
            loop = self.get_loop()
            # call_soon: the loop may be stopping, and the scope is cancelled in the loop. The
            # task's own step (woken by this cancellation) is queued before this callback.
            if loop.is_running():
                loop.call_soon(self._confirm, loop.time() + TAKE_BACK_WITHIN)
            else:
                loop.call_soon(self._end)
        return cancelled

    def _end(self) -> None:
        if not self.done():
            self.scope.cancel()

    def _confirm(self, until: float) -> None:
        cancelling = getattr(self, "cancelling", None)  # Python 3.11+
        if self.done() or cancelling is None or cancelling() == 0:
            return  # ended, or taken back (a driver's timeout)
        loop = self.get_loop()
        if loop.time() < until:
            loop.call_later(CONFIRM_EVERY, self._confirm, until)
        else:
            self.scope.cancel()


class Listeners:
    """A store's listener task per event loop, started on first use, and its followers.

    ``listen(wakeups)`` runs until cancelled (it reconnects on its own); it is stopped through
    an anyio cancel scope, so that a driver that swallows a ``CancelledError`` cannot keep it,
    nor :meth:`stop` or the loop's shutdown, waiting (see :class:`ListenerTask`).
    """

    def __init__(self, listen: Callable[[Wakeups], Awaitable[None]]) -> None:
        self._listen = listen
        # Per event loop, its listener; only the loop's own thread touches its entry. The
        # entry leaves when the task ends (or stop() takes it), so a closed loop's is gone.
        self._running: dict[asyncio.AbstractEventLoop, ListenerTask] = {}

    def __contains__(self, loop: asyncio.AbstractEventLoop) -> bool:
        return loop in self._running

    def start(self) -> Wakeups:
        """Start the running loop's listener unless it runs; return the loop's followers."""
        loop = asyncio.get_running_loop()
        running = self._running.get(loop)
        if running is not None:
            return running.wakeups
        wakeups = Wakeups()
        # In an empty context: not the caller's attempt (its wait-for edges), nor its trace.
        task = self._running[loop] = contextvars.Context().run(ListenerTask, self._listen, wakeups)

        def ended(_: object) -> None:
            if self._running.get(loop) is task:  # not a listener started after stop()
                del self._running[loop]
            wakeups.ended = True
            wakeups.listening.clear()
            wakeups.wake_all()  # they check again, and wait on the next listener
            if not task.cancelled() and (exc := task.exception()) is not None:
                kind = error_type(exc)  # the type only: a driver's message may hold a DSN
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
            await asyncio.wait([running])
