"""Work: what an attempt of one once runs, in a library task, to make and keep a value.

One ``Work`` per once, built by ``Once`` and shared by the stores of every event loop: it
resolves sub-dependencies, calls the function (through the backend, with retries), settles the
attempt with the record, and keeps a value that needs its cleanup later. It holds no state of
its own beyond what ``once()`` was given.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable, Hashable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, cast

import anyio

from . import _clock
from ._attempts import Attempt, working
from ._kinds import Kind, invoke
from ._policy import Policy
from ._records import Injector, Record, Resolve
from ._telemetry import across
from ._values import Value, shielded

if TYPE_CHECKING:
    from .backends._late import BoundBackend


class Work:
    """How the attempts of one once make its value."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        kind: Kind,
        injector: Injector | None,
        across: BoundBackend | None,
        policy: Policy,
    ) -> None:
        self.name = name
        # A bound method is held weakly, so that a once does not keep its object alive; any
        # other function strongly.
        self._strong: Callable[..., Any] | None = None
        self._held: Callable[[], Any] | None = None  # the weak method: None once its object is gone
        if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
            self._held = weakref.WeakMethod(fn)
        else:
            self._strong = fn
        self._kind = kind
        self._across = across
        self._policy = policy
        self._needs_stack = injector is not None or kind in (Kind.ASYNC_GEN, Kind.GEN)
        self.keeps = self._needs_stack  # whether an attempt's task may keep a value it made
        # An async def with no sub-dependencies and no backend: the attempt just awaits it.
        self._plain = kind is Kind.ASYNC and injector is None and across is None
        # Values that never expire nor refresh: their deadlines are known without asking.
        self._timeless = policy.ttl is None and policy.refresh is None
        # What a store runs per attempt: a value with a cleanup is made and kept inside a scope
        # of its own (see kept); without a timeout there is no other scope to open around it.
        self._inner = self.kept if self._needs_stack else self.attempt
        self.entry = self._inner if policy.timeout is None else self.run

    def fn(self) -> Callable[..., Any]:
        """The function that makes the value.

        Raises:
            ReferenceError: it was a bound method whose object is gone.
        """
        fn = self._strong if self._strong is not None else self._held()  # type: ignore[misc]
        if fn is None:
            raise ReferenceError(f"{self.name}: the object of this bound method no longer exists")
        return cast("Callable[..., Any]", fn)

    async def run(self, rec: Record, attempt: Attempt, *call: Any) -> None:
        """Run an attempt that has a timeout: inside the scope the timeout cancels."""
        # The scope a timeout cancels stays open while the value is kept, so that scopes a
        # generator opened before its yield are closed inside it.
        try:
            with anyio.CancelScope() as attempt.scope:
                await self._inner(rec, attempt, *call)
        finally:
            attempt.scope = None  # it holds its task, and so the loop: not past the run
            if attempt.ended is not None:  # timed out: teardown waits for this
                attempt.ended.set()

    async def kept(
        self,
        rec: Record,
        attempt: Attempt,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        resolve: Resolve | None,
    ) -> None:
        """Run an attempt whose value has a cleanup inside a scope that the cleanup shields.

        A generator may hold a task group or cancel scope across its ``yield``: that scope
        must be the task's innermost when the cleanup exits it, so the cleanup shields this
        scope, which encloses it, instead of opening one of its own inside it.
        """
        with anyio.CancelScope() as around:
            await self.attempt(rec, attempt, args, kwargs, resolve, around)

    async def attempt(
        self,
        rec: Record,
        attempt: Attempt,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        resolve: Resolve | None,
        around: anyio.CancelScope | None = None,
    ) -> None:
        """Make the value in a library task, settle ``attempt``, keep the value; never raises.

        ``around`` (for a value with a cleanup) is the scope of this task that encloses the
        making and the keeping: cleanups shield it.
        """
        started = _clock.monotonic()
        working.set(attempt)
        try:
            if self._policy.retries:
                make = functools.partial(
                    self.make, args, kwargs, resolve, around, rec.made is not None
                )
                value, stack = await self._policy.run(attempt, make)
            elif self._plain:  # the common case, without the layers it does not need
                fn = self._strong if self._strong is not None else self.fn()
                value, stack = await fn(*args, **kwargs), None
            else:
                kept = rec.made is not None
                value, stack = await self.make(args, kwargs, resolve, around, kept)
        except BaseException as exc:
            working.set(None)  # done with the attempt; its context must not keep it alive
            rec.fail(attempt, exc, _clock.monotonic() - started)
            attempt.task = None
            return
        working.set(None)
        # Settled below, after which this task does not suspend unless it keeps the value (then
        # the library tracks it): the attempt, which a value names, lets go of it and its loop.
        attempt.task = None
        now = _clock.monotonic()
        deadlines = (None, None) if self._timeless else self._policy.deadlines(now)
        # Only a value with a cleanup names its attempt (its logs and span do): a value alone
        # keeps no attempt, event or task alive.
        label = attempt if stack is not None else self.name
        made = Value(label, value, stack, now, time.time(), deadlines, around=around)
        if not rec.settle(attempt, made, None, None, now - started):
            await made.clean_here(around)  # made too late: nobody can get it
        elif stack is not None:
            await rec.keep(made, attempt)

    async def make(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        resolve: Resolve | None,
        around: anyio.CancelScope | None = None,
        kept: bool = False,
    ) -> tuple[Any, AsyncExitStack | None]:
        """One try: resolve sub-dependencies, call fn (through the backend, if any).

        ``kept``: the record keeps a value (being refreshed, or stale for ``stale_if_error=``),
        which a failure leaves served: the backend then never makes one in this process.
        """
        stack = AsyncExitStack() if self._needs_stack else None
        try:
            if resolve is not None:
                assert stack is not None
                kwargs = {**kwargs, **await resolve(stack)}
            make = functools.partial(
                invoke,
                self.fn(),
                self._kind,
                args,
                kwargs,
                stack,
                self.name,
                abandon_on_cancel=self._across is not None,
            )
            if self._across is None:
                value = await make()
            else:  # a keyed once's backend keeps one record per key (the attempt's)
                key: Hashable = cast(Attempt, working.get()).key
                value = await across(self._across, self.name, make, self._policy, key, kept)
        except BaseException:
            if stack is not None:
                # Release what the failed try had set up; the waiters get the try's own
                # exception, not one of its cleanup.
                with shielded(around), contextlib.suppress(BaseException):
                    await stack.aclose()
            raise
        return value, stack
