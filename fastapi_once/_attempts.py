"""Attempts in flight and the wait-for graph between them, which turns a deadlock into an error.

An attempt is one run of a once's function, shared by every caller that joins it before it
settles. A task doing an attempt's work knows it through the ``working`` context variable (child
tasks inherit it), and every wait it makes on another attempt is an edge of the wait-for graph.
A wait that would close a cycle raises instead of waiting forever.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import OnceCycleError
from ._keys import label

if TYPE_CHECKING:
    from ._events import Event

# The attempt whose work the current task is doing; child tasks inherit it through the context.
working: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "fastapi_once_working", default=None
)


class Attempt:
    """One run of a once's function and its outcome, delivered to every waiter.

    Its outcome, written before ``done`` is set and only read after, is what its waiters get
    (``value``, or ``raises``, raised with ``traceback`` and ``context``) and what the run ended
    with (``error``, None on success). They differ only where the run failed and its waiters get
    a value kept past its ttl (``stale_if_error=``, see :meth:`fall_back`), which the record
    withdraws if it retires that value while the run goes on (see :meth:`withdraw`). Only the
    loop's thread touches an attempt, except ``waiting_on``: work its task hands to the process
    scope's loop adds and removes its own edges there (single list operations, atomic under the
    GIL).
    """

    __slots__ = (
        "_label", "context", "done", "ended", "error", "key", "logs", "name", "number", "picked",
        "raises", "scope", "show_key", "span", "task", "traceback", "value", "waiters",
        "waiting_on", "watched",
    )  # fmt: skip

    def __init__(self, name: str, key: object, done: Event) -> None:
        self.name, self.key = name, key
        self._label: str | None = None
        self.show_key = False  # name the key verbatim (once(..., log_keys=True)), not by digest
        self.logs = False  # log its start and success at INFO (the level was on when it started)
        self.number = 0  # the how-manieth attempt of its once in its loop (status().attempts)
        self.span: Any = None  # its span's context, when traced: callers that wait link to it
        self.watched = False  # telemetry was set up when it started: its end is recorded
        self.done = done  # set once the outcome is in
        # Set when the run itself ends, where that is later than its outcome (it timed out):
        # what a teardown waits for.
        self.ended: Event | None = None
        # Calls waiting for the outcome; ``picked``, if someone asks, is set when none is left,
        # so that a value is not cleaned up before the calls it was made for have it.
        self.waiters = 0
        self.picked: Event | None = None
        self.value: Any = None
        self.error: BaseException | None = None  # what the run failed with
        self.raises: BaseException | None = None  # what its waiters raise (else get ``value``)
        self.traceback: Any = None
        self.context: BaseException | None = None
        # The cancel scope around the work, so that a timeout can stop it from another task.
        self.scope: anyio.CancelScope | None = None
        # The attempts this attempt's work waits for: the edges that cycle detection walks.
        self.waiting_on: list[Attempt] = []
        self.task: object = None  # the library task doing the work, where the attempt holds it

    @property
    def label(self) -> str:
        """How logs and errors name this attempt (a key by its digest, computed when needed)."""
        if self._label is None:
            self._label = label(self.name, self.key, verbatim=self.show_key)
        return self._label

    def __str__(self) -> str:
        return self.label

    @property
    def settled(self) -> bool:
        """Whether the outcome is in (waiters are being or have been woken)."""
        return self.done.is_set()

    @property
    def fell_back(self) -> bool:
        """Whether the run failed and its waiters get a value instead (see :meth:`fall_back`)."""
        return self.raises is None and self.error is not None

    def fail(self, error: BaseException, traceback: Any) -> None:
        """Deliver ``error`` (raised with ``traceback``) to every waiter."""
        self.error = self.raises = error
        self.traceback, self.context = traceback, error.__context__
        self.done.set()

    def fall_back(self, value: Any, error: BaseException, traceback: Any) -> None:
        """Deliver ``value`` to every waiter, though the attempt failed with ``error``.

        For a value kept past its ttl (``stale_if_error=``); ``error`` stays the outcome that
        logs, spans and ``status()`` report.
        """
        self.value, self.error = value, error
        self.traceback, self.context = traceback, error.__context__
        self.done.set()

    def withdraw(self) -> None:
        """The value given by :meth:`fall_back` is retired: waiters from now on get the error."""
        self.value, self.raises = None, self.error

    def result(self) -> Any:
        """Return the value, or raise the error as the attempt raised it."""
        error = self.raises
        if error is None:
            return self.value
        # Every waiter raises the one exception object. Raising sets its traceback and, inside
        # an ``except`` block, its context to the raiser's own: both are put back first, so that
        # no waiter sees another's frames or exception and the traceback does not grow.
        error.__context__ = self.context
        raise error.with_traceback(self.traceback)


def raise_again(error: BaseException, traceback: Any, context: BaseException | None) -> None:
    """Raise a remembered error as it was first raised (see :meth:`Attempt.result`)."""
    error.__context__ = context
    raise error.with_traceback(traceback)


def _path(start: Attempt, goal: Attempt) -> list[Attempt] | None:
    """Return a chain of waits from ``start`` to ``goal``, if there is one."""
    todo = [[start]]
    seen: set[int] = set()
    while todo:
        path = todo.pop()
        node = path[-1]
        if node is goal:
            return path
        if id(node) not in seen:
            seen.add(id(node))
            todo.extend([*path, nxt] for nxt in node.waiting_on)
    return None


def check_wait(attempt: Attempt, action: str | None = None) -> None:
    """Raise :class:`OnceCycleError` if the current task waiting for ``attempt`` would deadlock.

    Args:
        attempt: the attempt about to be awaited.
        action: what waits, e.g. ``"reset()"``; None when a call joins the attempt.
    """
    me = working.get()
    if me is None:
        return
    # attempt -> ... -> me already wait on each other; me waiting on attempt closes the loop.
    path = _path(attempt, me)
    if path is not None:
        raise OnceCycleError([*(a.label for a in path), attempt.label], action)


async def wait(attempt: Attempt, action: str | None = None) -> None:
    """Wait until ``attempt`` settles, recording the wait in the wait-for graph.

    A teardown (``action`` given) waits until the run has ended, also when its waiters were
    released earlier by a timeout.
    """
    check_wait(attempt, action)
    if action is not None:
        event = attempt.ended if attempt.ended is not None else attempt.done
    else:
        event, attempt.waiters = attempt.done, attempt.waiters + 1
    me = working.get()
    if me is not None:
        me.waiting_on.append(attempt)
    try:
        await event.wait()
    finally:
        if me is not None:
            me.waiting_on.remove(attempt)
        if action is None:
            attempt.waiters -= 1
            if not attempt.waiters and attempt.picked is not None:
                attempt.picked.set()
