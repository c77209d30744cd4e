"""The running event loop's identity and its library's own events (asyncio or trio).

A leaf of the core: nothing here holds a loop once its waiters are woken, so what the library
keeps for a loop (attempts, values) never keeps the loop itself alive.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol


def current_loop() -> object:
    """Return an object that identifies the running event loop (asyncio loop or trio token).

    Raises:
        RuntimeError: no asyncio or trio event loop is running in this thread.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
    raise RuntimeError(
        "a once must be awaited inside a running event loop (asyncio or trio); "
        "call it from an async function"
    )


def proves_thread(loop: object) -> bool:
    """Whether ``loop`` records the thread that runs it, a proof that it is the running loop.

    An asyncio ``BaseEventLoop`` sets ``_thread_id`` while it runs, and a thread runs at most
    one loop at a time: while ``loop._thread_id == threading.get_ident()``, ``loop`` is the
    running loop, with no system call (``get_running_loop()`` calls ``getpid()`` before Python
    3.12). uvloop and trio keep no such record: their callers ask the slow way.
    """
    return isinstance(loop, asyncio.BaseEventLoop)


class _Unproven:
    __slots__ = ()
    _thread_id = None  # no thread's id: the proof never holds


_UNPROVEN = _Unproven()


def unproven() -> object:
    """Stands for a loop reference where no loop proves its thread (see :func:`proves_thread`)."""
    return _UNPROVEN


class Event(Protocol):
    """An event of the running loop's own library (asyncio or trio)."""

    def set(self) -> object:
        """Wake every waiter."""

    def is_set(self) -> bool:
        """Whether it is set."""

    def wait(self) -> Awaitable[object]:
        """What to await until it is set."""


class Flag:
    """An asyncio event whose ``wait()`` is the waiter's own future, awaited by the caller.

    Unlike ``asyncio.Event.wait()`` no coroutine sits between the waiting task and its future:
    a waiter resumes one frame fewer. A cancelled waiter cancels its own future only; ``set``
    skips it. Only the loop's thread touches it, and it holds no reference to the loop (a
    waiter's future does, until it is set).
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        # The futures of the calls waiting; None once set.
        self._waiters: list[asyncio.Future[None]] | None = []

    def is_set(self) -> bool:
        """Whether it is set."""
        return self._waiters is None

    def set(self) -> None:
        """Wake every waiter (once)."""
        waiters, self._waiters = self._waiters, None
        if waiters:
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        """A future that completes when the flag is set (at once if it is)."""
        future: asyncio.Future[None] = asyncio.Future()  # the running loop's
        if self._waiters is None:
            future.set_result(None)
        else:
            self._waiters.append(future)
        return future


def event_factory(loop: object) -> Callable[[], Event]:
    """What makes events for ``loop``: a :class:`Flag`, or trio's own event class."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        return Flag
    import trio

    return trio.Event


def new_event(loop: object) -> Event:
    """An event for ``loop``: its library's own, without anyio's per-event dispatch."""
    return event_factory(loop)()


def running_event() -> Event:
    """A new event of the running loop's library.

    Raises:
        RuntimeError: no asyncio or trio event loop is running in this thread.
    """
    return new_event(current_loop())
