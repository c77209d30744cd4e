"""Wakeups: one event loop's keyed followers, waiting for that loop's listener to wake them.

A backend keeps one listener connection per event loop that receives every keyed
notification (a leader's success or failure); followers do not hold a connection while they
wait, they register here and are woken by record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import anyio

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
