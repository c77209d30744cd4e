"""A value a once made, its deadlines, and its retirement: cleanup exactly once, where it was made.

A value with a cleanup (the code after a generator's ``yield``, or of its sub-dependencies) is
kept by the library task that made it: that task parks until the value is retired (by ttl,
refresh, eviction, reset or teardown), then runs the cleanup itself, so a generator that holds a
task group or cancel scope across its ``yield`` exits it in the task that entered it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio

from ._attempts import Attempt, working
from ._events import Event, running_event
from ._keys import NOKEY
from ._tasks import cancelling_retires
from ._telemetry import cleanup_span, error_type, fields

if sys.version_info >= (3, 11):  # pragma: no cover
    from builtins import BaseExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("fastapi_once")

_serials = itertools.count()  # creation order, for cleanup newest first


class Value:
    """A made value, when it stops being fresh and servable, and its cleanup.

    Only the loop's thread touches it. ``retired`` is set once, by :meth:`retire`; the cleanup
    runs once, in :meth:`clean_here`, after which ``done`` is set.
    """

    __slots__ = (
        "_around",
        "_cleaning",
        "_done",
        "_errors",
        "_retired",
        "expires_at",
        "label",
        "made_at",
        "node",
        "refresh_at",
        "serial",
        "stack",
        "value",
        "wall_time",
    )

    def __init__(
        self,
        label: object,
        value: Any,
        stack: AsyncExitStack | None,
        made_at: float,
        wall_time: float,
        deadlines: tuple[float | None, float | None],
        around: anyio.CancelScope | None = None,
    ) -> None:
        self.label = label  # formatted with %s only when logged (a key's digest costs)
        self.serial = next(_serials)
        self.value, self.stack = value, stack
        self.made_at, self.wall_time = made_at, wall_time
        self.refresh_at, self.expires_at = deadlines
        self._around = around  # the scope of the making task that the cleanup shields
        self._cleaning = False
        self._errors: list[BaseException] | None = None  # what the cleanup raised
        # The running loop's own events, which hold no reference to it (see _events); and the
        # cleanup as a node of the wait-for graph: a reset that waits for it from inside the
        # cleanup itself (or from work the cleanup waits for) raises instead of hanging. A value
        # without a cleanup needs none of them.
        self._retired: Event | None = None
        self._done: Event | None = None
        self.node: Attempt | None = None
        if stack is not None:
            self._retired, self._done = running_event(), running_event()
            name = getattr(label, "name", label)
            self.node = Attempt(f"{name} (cleanup)", NOKEY, self._done)

    @property
    def pending(self) -> bool:
        """Whether the value has a cleanup that has not finished."""
        return self._done is not None and not self._done.is_set()

    def retire(self) -> None:
        """Take the value out of service: its keeper runs the cleanup."""
        if self._retired is not None:
            self._retired.set()

    async def keep(
        self,
        due: Callable[[], float | None],
        abandoned: Callable[[], None],
        handed_out: Callable[[], Awaitable[None]],
    ) -> None:
        """Park the task that made the value until it is retired; then clean it up here.

        Args:
            due: seconds until time retires the value (None: never); called again when they
                have passed, it retires the value itself.
            abandoned: called when the event loop ends first (its tasks are cancelled).
            handed_out: waits until the calls the value was made for have it.
        """
        retired = self._retired
        assert retired is not None, "only a value with a cleanup is kept"

        def loop_ends() -> None:
            if not retired.is_set():
                abandoned()
                retired.set()

        working.set(self.node)
        with cancelling_retires(loop_ends):
            try:
                while not retired.is_set():
                    delay = due()
                    with anyio.move_on_after(float("inf") if delay is None else max(delay, 0)):
                        await retired.wait()
                with anyio.CancelScope(shield=True):
                    await handed_out()
            except anyio.get_cancelled_exc_class():
                loop_ends()
                raise
            finally:
                around, self._around = self._around, None  # it holds its task, so the loop
                await self.clean_here(around)

    async def clean_here(self, around: anyio.CancelScope | None = None) -> None:
        """Run the cleanup in the current task, once, shielded from cancellation.

        Args:
            around: in the task that made the value, the scope enclosing its making (see
                :func:`shielded`); None elsewhere.
        """
        if self.stack is None or self._cleaning:
            return
        self._cleaning, started = True, time.monotonic()
        name, attempt = (
            str(getattr(self.label, "name", self.label)),
            getattr(self.label, "number", None),
        )
        with shielded(around):
            try:
                with cleanup_span(self.label):
                    await self.stack.aclose()
            except BaseException as exc:
                # The type only: exception text can hold secrets; DEBUG has the details.
                kind, took = error_type(exc), time.monotonic() - started
                extra = fields(
                    name, "cleanup_failed", duration_s=took, error_type=kind, attempt=attempt
                )
                logger.error("%s: cleanup failed with %s", self.label, kind, extra=extra)
                logger.debug("%s: cleanup failure", self.label, exc_info=exc, extra=extra)
                self._errors = [*(self._errors or ()), exc]
            else:
                took = time.monotonic() - started
                extra = fields(name, "cleaned_up", duration_s=took, attempt=attempt)
                logger.info("%s: cleaned up", self.label, extra=extra)
        assert self._done is not None
        self._done.set()

    def take_errors(self) -> list[BaseException]:
        """What the cleanup raised, for the first one to ask."""
        errors, self._errors = self._errors, None
        return errors or []


@contextlib.contextmanager
def shielded(around: anyio.CancelScope | None) -> Iterator[None]:
    """Shield the block from cancellation, through ``around`` if given, else a new scope.

    ``around`` is a scope of the current task that encloses the block and every scope the block
    exits: a generator's task group or cancel scope entered before its ``yield`` and exited by
    its cleanup must be the task's innermost scope then, so no scope may be opened in between.
    """
    if around is None:
        with anyio.CancelScope(shield=True):
            yield
        return
    was, around.shield = around.shield, True
    try:
        yield
    finally:
        around.shield = was


def raise_all(errors: list[BaseException]) -> None:
    """Raise the one error, or a group of several; nothing when there are none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise BaseExceptionGroup("cleanup of several once values failed", errors)
