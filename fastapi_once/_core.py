"""The single-flight primitive: make a value once per event loop and share it with every caller.

This module knows nothing of FastAPI; it depends on anyio only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import sys
import threading
import time
import weakref
from asyncio import get_running_loop
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import anyio

from ._errors import OnceCancelledError, OnceCycleError
from ._kinds import Kind, invoke, kind_of
from ._loops import current_loop, spawn
from ._policy import Policy
from ._status import OnceStatus, State

if TYPE_CHECKING:
    from .backends import Backend

if sys.version_info >= (3, 11):  # pragma: no cover
    from builtins import BaseExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if sys.version_info >= (3, 12):  # pragma: no cover
    from typing import ParamSpec, final
else:  # pragma: no cover
    from typing_extensions import ParamSpec, final

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("fastapi_once")

# The clock of expiry, refresh and cooldown; a module attribute so tests can move time.
monotonic = time.monotonic


# --- attempts and values --------------------------------------------------------------------------

# The attempt whose work the current task is doing; child tasks inherit it through the context.
_working: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "fastapi_once_working", default=None
)


class _Attempt:
    """One run of a once's function, shared by every caller that joins it before it settles."""

    __slots__ = ("done", "error", "label", "traceback", "value", "waiting_on")

    def __init__(self, label: str) -> None:
        self.label = label
        self.done = anyio.Event()  # set exactly once, after value or error is filled in
        self.value: Any = None
        self.error: BaseException | None = None
        self.traceback: Any = None
        # The attempts this attempt's work is waiting for: the edges of the wait-for graph that
        # cycle detection walks.
        self.waiting_on: list[_Attempt] = []

    def result(self) -> Any:
        if self.error is not None:
            # Every waiter raises the one exception with the attempt's own traceback, so the
            # traceback does not grow with each waiter that re-raises it.
            raise self.error.with_traceback(self.traceback)
        return self.value


def _path(start: _Attempt, goal: _Attempt) -> list[_Attempt] | None:
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


class _Made:
    """A value a once made, with its deadlines and the cleanup that runs when it is retired."""

    __slots__ = (
        "expires_at",
        "key",
        "made_at",
        "once",
        "refresh_at",
        "stack",
        "stale_at",
        "value",
        "wall_time",
    )

    def __init__(
        self,
        once: Once[Any, Any],
        key: Hashable,
        value: Any,
        stack: AsyncExitStack | None,
        policy: Policy,
    ) -> None:
        self.once = once
        self.key = key
        self.value = value
        self.stack = stack
        self.made_at = monotonic()
        self.wall_time = time.time()
        self.expires_at = None if policy.ttl is None else self.made_at + policy.ttl
        self.refresh_at = None if policy.refresh is None else self.made_at + policy.refresh
        # The hot path's one deadline: past it the value is due for refresh or expired.
        self.stale_at = self.refresh_at if self.refresh_at is not None else self.expires_at

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class _Failure:
    """A failed attempt remembered for the cooldown, so calls fail fast instead of retrying."""

    __slots__ = ("error", "traceback", "until")

    def __init__(self, error: BaseException, traceback: Any, until: float) -> None:
        self.error, self.traceback, self.until = error, traceback, until


class _Loop:
    """What the onces keep for one event loop. Only that loop's thread touches it."""

    __slots__ = ("made", "states")

    def __init__(self) -> None:
        self.states: dict[Once[Any, Any], _State] = {}
        # Every value made in this loop and not retired yet, in order of creation.
        self.made: dict[_Made, None] = {}


class _State:
    """What one once keeps for one event loop. Only that loop's thread touches it."""

    __slots__ = (
        "attempts",
        "failures",
        "hits",
        "joins",
        "last_duration",
        "last_error",
        "made",
        "refreshing",
        "registry",
        "tries",
        "values",
    )

    def __init__(self, registry: _Loop) -> None:
        self.registry = registry
        self.made: _Made | None = None  # the value of an unkeyed once
        self.values: OrderedDict[Hashable, _Made] = OrderedDict()  # keyed: least recent first
        # In flight, by key (None when unkeyed): first attempts, and refreshes of a served value.
        self.attempts: dict[Hashable, _Attempt] = {}
        self.refreshing: dict[Hashable, _Attempt] = {}
        self.failures: OrderedDict[Hashable, _Failure] = OrderedDict()  # in their cooldown
        self.hits = 0
        self.joins = 0
        self.tries = 0
        self.last_duration: float | None = None
        self.last_error: BaseException | None = None

    def current(self, key: Hashable) -> _Made | None:
        return self.made if key is None else self.values.get(key)

    def forget(self, made: _Made) -> None:
        if self.made is made:
            self.made = None
        elif self.values.get(made.key) is made:
            del self.values[made.key]
        self.registry.made.pop(made, None)

    def in_flight(self) -> list[_Attempt]:
        return [*self.attempts.values(), *self.refreshing.values()]


# Weak keys: a closed and dropped loop takes its state with it.
_loops: weakref.WeakKeyDictionary[object, _Loop] = weakref.WeakKeyDictionary()
_loops_lock = threading.Lock()
_all: weakref.WeakSet[Once[Any, Any]] = weakref.WeakSet()


def registry() -> list[Once[Any, Any]]:
    """Return every once in the process, sorted by name (for readiness views and tests)."""
    return sorted(_all, key=lambda o: o.name)


# --- cleanup --------------------------------------------------------------------------------------


async def _cleanup(made: Iterable[_Made]) -> None:
    """Run each value's cleanup once, shielded, and raise what failed after all have run."""
    errors: list[BaseException] = []
    for item in made:
        if item.stack is None:
            continue
        with anyio.CancelScope(shield=True):
            try:
                await item.stack.aclose()
            except BaseException as exc:
                # The type only: exception text can hold secrets; DEBUG has the details.
                logger.error("%s: cleanup failed with %s", item.once.name, type(exc).__name__)
                logger.debug("%s: cleanup failure", item.once.name, exc_info=exc)
                errors.append(exc)
            else:
                logger.info("%s: cleaned up", item.once.name)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise BaseExceptionGroup("cleanup of several once values failed", errors)


async def _cleanup_quietly(made: _Made) -> None:
    # Logged by _cleanup; a library task must not raise.
    with contextlib.suppress(BaseException):
        await _cleanup([made])


def _retire(loop: object, state: _State, made: _Made) -> None:
    """Forget ``made`` (nothing can get it any more) and clean it up in a library task."""
    state.forget(made)
    if made.stack is not None:
        spawn(loop, functools.partial(_cleanup_quietly, made), f"fastapi_once: clean {made.once}")


async def reset_all() -> None:
    """Clean up and forget every value made in the running event loop, newest first.

    Attempts in flight are awaited first, so what they make is cleaned up too. Each cleanup runs
    exactly once, shielded from cancellation; the next call of any once makes its value anew.

    Raises:
        Exception: the cleanup's exception, after every other cleanup has run (a
            ``BaseExceptionGroup`` when several failed).
    """
    registry = _loops.get(current_loop())
    if registry is None:
        return
    for attempt in [a for state in registry.states.values() for a in state.in_flight()]:
        await attempt.done.wait()
    made = list(registry.made)
    for item in made:
        registry.states[item.once].forget(item)
    for state in registry.states.values():
        state.failures.clear()
    await _cleanup(reversed(made))


def forget_everything() -> None:
    """Forget every once's values in every event loop; run their cleanups in a fresh loop.

    For test teardown, outside any event loop: cleanup errors are logged, not raised.

    Raises:
        RuntimeError: an event loop is running in this thread (use ``await reset_all()``).
    """
    try:
        current_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("forget_everything() runs outside event loops; use await reset_all()")
    with _loops_lock:
        registries = list(_loops.values())
    made: list[_Made] = []
    for registry in registries:
        made.extend(registry.made)
        registry.made.clear()
        for state in registry.states.values():
            state.__init__(registry)  # type: ignore[misc]
    if any(item.stack is not None for item in made):
        with contextlib.suppress(BaseException):
            anyio.run(_cleanup, reversed(made))


# --- the primitive --------------------------------------------------------------------------------


class Injector(Protocol):
    """Supplies extra keyword arguments (sub-dependencies) when a value is made."""

    @property
    def param(self) -> str:
        """The hidden keyword argument through which a caller passes its context."""

    async def __call__(self, context: object, stack: AsyncExitStack) -> dict[str, Any]:
        """Return the keyword arguments; cleanups of what they made go on ``stack``."""


_NO_STATE: tuple[object, Any] = (object(), None)


@final
class Once(Generic[P, T]):
    """A function whose value is made once per event loop and shared with every caller.

    Create it with :func:`fastapi_once.once`. ``await o(...)`` returns the value: the first
    callers start one attempt in a task the library owns, everyone else waits for that same
    attempt, and once the value exists a call is an attribute check. A failed attempt is shared
    by its waiters and not cached. ``o`` is also a FastAPI dependency: ``Depends(o)``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        key: Callable[..., Hashable] | None = None,
        maxsize: int = 128,
        injector: Injector | None = None,
        across: Backend | None = None,
        policy: Policy | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.options: dict[str, Any] = dict(options or {})
        self._kind = kind_of(fn)
        self._key = key
        self._maxsize = maxsize
        self._injector = injector
        self._across = across
        self._policy = policy or Policy()
        self._param = injector.param if injector is not None else None
        self._needs_stack = injector is not None or self._kind in (Kind.ASYNC_GEN, Kind.GEN)
        # (loop, state) of the loop that called last: the hot path's one-read cache. A tuple so
        # that a reader in another thread never pairs one loop with another loop's state.
        self._last: tuple[object, _State | None] = _NO_STATE
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = getattr(fn, "__module__", None) or __name__
        self.__doc__ = getattr(fn, "__doc__", None)
        if sys.version_info >= (3, 12):  # pragma: no cover
            inspect.markcoroutinefunction(self)
        _all.add(self)

    def __repr__(self) -> str:
        return f"<Once {self.name}>"

    @property
    def keyed(self) -> bool:
        """Whether the once keeps one value per key (it was made with ``key=``)."""
        return self._key is not None

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Return the value, making it first if no call in this event loop has made it yet.

        Raises:
            Exception: whatever the shared attempt raised; the next call tries again (or, within
                a ``cooldown``, fails fast with the same exception).
            OnceCycleError: the value is being made by a chain of calls that awaits it.
            OnceCancelledError: the attempt was cancelled from inside.
            OnceTimeoutError: the attempt took longer than ``timeout``.
        """
        # The running loop, inline: this is the hot path (current_loop() handles trio).
        try:
            loop: object = get_running_loop()
        except RuntimeError:
            loop = current_loop()
        last = self._last
        state: _State = last[1] if last[0] is loop else self._state_for(loop)  # type: ignore[assignment]
        if self._key is None:
            made = state.made
            if made is not None and (made.stale_at is None or monotonic() < made.stale_at):
                state.hits += 1
                return made.value  # type: ignore[no-any-return]
            context = kwargs.pop(self._param, None) if self._param is not None else None
            return await self._slow(loop, state, None, made, args, kwargs, context)  # type: ignore[no-any-return]
        context = kwargs.pop(self._param, None) if self._param is not None else None
        key = self._key(*args, **kwargs)
        try:
            made = state.values.get(key)
        except TypeError:
            raise self._unhashable(key, args, kwargs) from None
        if made is not None and (made.stale_at is None or monotonic() < made.stale_at):
            state.values.move_to_end(key)
            state.hits += 1
            return made.value  # type: ignore[no-any-return]
        return await self._slow(loop, state, key, made, args, kwargs, context)  # type: ignore[no-any-return]

    def _state_for(self, loop: object) -> _State:
        with _loops_lock:
            registry = _loops.get(loop)
            if registry is None:
                registry = _loops[loop] = _Loop()
            state = registry.states.get(self)
            if state is None:
                state = registry.states[self] = _State(registry)
        self._last = (loop, state)
        return state

    def _existing_state(self) -> _State | None:
        """The state of the running loop (or, outside any loop, of the last one), if any."""
        try:
            loop = current_loop()
        except RuntimeError:
            return self._last[1]
        registry = _loops.get(loop)
        return registry.states.get(self) if registry is not None else None

    def _unhashable(self, key: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TypeError:
        bound = inspect.signature(self.fn).bind_partial(*args, **kwargs).arguments
        culprits = [name for name, value in bound.items() if not _hashable(value)]
        where = f" (parameter {', '.join(map(repr, culprits))})" if culprits else ""
        return TypeError(
            f"the key of {self.name} is an unhashable {type(key).__name__}{where}; pass key= a "
            "function that returns a hashable value, e.g. key=lambda items: tuple(items)"
        )

    async def _slow(
        self,
        loop: object,
        state: _State,
        key: Hashable,
        made: _Made | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: object,
    ) -> Any:
        if self._key is None and (args or kwargs):
            raise TypeError(
                f"{self.name} takes no arguments: it has no key=, so it makes one value for "
                "every caller; pass key= to keep one value per argument"
            )
        now = monotonic()
        if made is not None:
            if not made.expired(now):
                # Due for refresh, not expired: serve it while one background refresh runs.
                if key not in state.refreshing:
                    self._start(loop, state, key, args, kwargs, context, replacing=made)
                state.hits += 1
                return made.value
            _retire(loop, state, made)
        failure = state.failures.get(key)
        if failure is not None:
            if now < failure.until:
                raise failure.error.with_traceback(failure.traceback)
            del state.failures[key]
        me = _working.get()
        attempt = state.attempts.get(key)
        if attempt is None:
            attempt = self._start(loop, state, key, args, kwargs, context, replacing=None)
        else:
            state.joins += 1
            if me is not None:
                # attempt -> ... -> me already wait on each other; me waiting on attempt would
                # close the loop, and nothing in it could ever finish.
                path = _path(attempt, me)
                if path is not None:
                    raise OnceCycleError([*(a.label for a in path), attempt.label])
        if me is None:
            await attempt.done.wait()
        else:
            me.waiting_on.append(attempt)
            try:
                await attempt.done.wait()
            finally:
                me.waiting_on.remove(attempt)
        return attempt.result()

    def _start(
        self,
        loop: object,
        state: _State,
        key: Hashable,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: object,
        replacing: _Made | None,
    ) -> _Attempt:
        label = self.name if self._key is None else f"{self.name}[{key!r}]"
        attempt = _Attempt(label)
        (state.attempts if replacing is None else state.refreshing)[key] = attempt
        state.tries += 1
        logger.info("%s: %s started", label, "attempt" if replacing is None else "refresh")
        work = functools.partial(self._run, loop, state, key, attempt, args, kwargs, context)
        spawn(loop, functools.partial(work, replacing), f"fastapi_once: {label}")
        return attempt

    async def _run(
        self,
        loop: object,
        state: _State,
        key: Hashable,
        attempt: _Attempt,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: object,
        replacing: _Made | None,
    ) -> None:
        """Make the value in the library's task and settle ``attempt``; never raises."""
        _working.set(attempt)
        in_flight = state.attempts if replacing is None else state.refreshing
        started = monotonic()
        make = functools.partial(self._make, args, kwargs, context)
        try:
            value, stack = await self._policy.run(attempt.label, make)
        except BaseException as exc:
            state.last_duration = monotonic() - started
            # Forget the failed attempt before waking its waiters, so that any of them that calls
            # again starts a fresh attempt instead of joining this one.
            in_flight.pop(key, None)
            self._failed(state, key, attempt, exc, refresh=replacing is not None)
            attempt.done.set()
            return
        in_flight.pop(key, None)
        made = _Made(self, key, value, stack, self._policy)
        state.last_duration = made.made_at - started
        state.last_error = None
        old = state.current(key)
        if old is not None:
            _retire(loop, state, old)
        state.registry.made[made] = None
        if self._key is None:
            state.made = made
        else:
            state.values[key] = made
            if len(state.values) > self._maxsize:
                _retire(loop, state, next(iter(state.values.values())))
        logger.info(
            "%s: %s in %.2f s",
            attempt.label,
            "ready" if replacing is None else "refreshed",
            state.last_duration,
        )
        attempt.value = value
        attempt.done.set()

    async def _make(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], context: object
    ) -> tuple[Any, AsyncExitStack | None]:
        """One try: resolve sub-dependencies, call fn (through the backend, if any)."""
        stack = AsyncExitStack() if self._needs_stack else None
        try:
            if self._injector is not None:
                assert stack is not None
                kwargs = {**kwargs, **await self._injector(context, stack)}
            make = functools.partial(
                invoke,
                self.fn,
                self._kind,
                args,
                kwargs,
                stack,
                self.name,
                # With across=, a lost lock cancels the work: a def's thread cannot be
                # interrupted, so it is abandoned and its late result dropped.
                abandon_on_cancel=self._policy.timeout is not None or self._across is not None,
            )
            if self._across is None:
                value = await make()
            else:
                value = await self._across.run_once(self.name, make, ttl=self._policy.ttl)
        except BaseException:
            if stack is not None:
                # Release what the failed try had set up; the waiters get the try's own
                # exception, not one of its cleanup.
                with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                    await stack.aclose()
            raise
        return value, stack

    def _failed(
        self, state: _State, key: Hashable, attempt: _Attempt, exc: BaseException, refresh: bool
    ) -> None:
        error, traceback = exc, exc.__traceback__
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            error, traceback = OnceCancelledError(attempt.label), None
            error.__cause__ = exc
        state.last_error = error
        what = "refresh" if refresh else "attempt"
        # The type only: exception text can hold secrets (a DSN, a token); DEBUG has the details.
        logger.warning(
            "%s: %s failed after %.2f s with %s%s",
            attempt.label,
            what,
            state.last_duration,
            type(error).__name__,
            "; keeping the current value" if refresh else "",
        )
        logger.debug("%s: %s failure", attempt.label, what, exc_info=error)
        cooldown = self._policy.cooldown
        countable = isinstance(error, Exception) and not isinstance(error, OnceCancelledError)
        if not refresh and cooldown is not None and countable:
            state.failures[key] = _Failure(error, traceback, monotonic() + cooldown)
            if len(state.failures) > self._maxsize:
                state.failures.popitem(last=False)
        attempt.error, attempt.traceback = error, traceback

    async def reset(self) -> None:
        """Clean up and forget this once's value(s) in the running event loop.

        Attempts and refreshes in flight are awaited first and their values cleaned up too; a
        failure's cooldown is forgotten. With ``across=``, the backend's record is cleared too,
        so the next call in any process runs the function again. (``reset_all()`` and lifespan
        shutdown forget values in this process only.)

        Raises:
            Exception: what a cleanup raised, after every cleanup has run.
        """
        state = self._existing_state()
        if state is None:
            # Nothing made here, but another process may have recorded a value: clear it.
            if self._across is not None:
                await self._across.reset(self.name)
            return
        for attempt in state.in_flight():
            await attempt.done.wait()
        made = [state.made] if state.made is not None else list(state.values.values())
        for item in made:
            state.forget(item)
        state.failures.clear()
        try:
            await _cleanup(reversed(made))
        finally:
            if self._across is not None:
                await self._across.reset(self.name)

    def status(self, *, details: bool = False) -> OnceStatus:
        """Return a snapshot of this once in the running event loop (or the last one used).

        Args:
            details: include the last error's message (off by default: it can hold secrets).
        """
        state = self._existing_state()
        if state is None:
            return OnceStatus(name=self.name, state="idle")
        now = monotonic()
        error = state.last_error
        keys: dict[State, int] | None = None
        size: int | None = None
        if self._key is None:
            made = state.made if state.made is not None and not state.made.expired(now) else None
            current: State
            if state.refreshing:
                current = "refreshing"
            elif made is not None:
                current = "ready"
            elif state.attempts:
                current = "running"
            elif error is not None:
                current = "failed"
            else:
                current = "idle"
        else:
            live = [m for m in state.values.values() if not m.expired(now)]
            made = max(live, key=lambda m: m.made_at) if live else None
            failed = sum(1 for f in state.failures.values() if now < f.until)
            counts: dict[State, int] = {
                "ready": len(live) - len(state.refreshing),
                "refreshing": len(state.refreshing),
                "running": len(state.attempts),
                "failed": failed,
            }
            keys, size = counts, len(state.values)
            current = next((s for s in ("ready", "refreshing", "running") if counts[s]), "idle")
            if current == "idle" and (failed or error is not None):
                current = "failed"
        return OnceStatus(
            name=self.name,
            state=current,
            made_at=None
            if made is None
            else datetime.fromtimestamp(made.wall_time, tz=timezone.utc),
            last_duration=state.last_duration,
            attempts=state.tries,
            last_error_type=None if error is None else type(error).__name__,
            last_error_message=str(error) if details and error is not None else None,
            hits=state.hits,
            joins=state.joins,
            keys=keys,
            size=size,
        )

    def _kick(self, context: object) -> bool:
        """Start making an unkeyed value in the background unless it is there or on its way.

        Returns whether an attempt was started. Used by readiness probes: nothing waits.
        """
        loop = current_loop()
        state = self._state_for(loop)
        made, now = state.made, monotonic()
        if (made is not None and not made.expired(now)) or None in state.attempts:
            return False
        failure = state.failures.get(None)
        if failure is not None and now < failure.until:
            return False
        if made is not None:
            _retire(loop, state, made)
        self._start(loop, state, None, (), {}, context, replacing=None)
        return True

    def _set(self, value: Any) -> None:
        """Serve ``value`` in the running loop until :meth:`_unset` (tests only)."""
        self._state_for(current_loop()).made = _Made(self, None, value, None, Policy())

    def _unset(self, value: Any) -> None:
        state = self._existing_state()
        if state is not None and state.made is not None and state.made.value is value:
            state.made = None

    async def _get(self, context: object) -> T:
        """Return an unkeyed once's value, making it with ``context`` (e.g. the app) if needed."""
        kwargs: dict[str, Any] = {self._param: context} if self._param is not None else {}
        call: Any = self
        return cast(T, await call(**kwargs))


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
