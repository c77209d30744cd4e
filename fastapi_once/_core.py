"""The single-flight primitive: make a value once per event loop and key; share it with every caller.

This module knows nothing of FastAPI; it depends on anyio only. One record per (once, event
loop, key) holds a stored state; an unkeyed once is the key-less case of the same store. Every
transition is a method of ``_Record`` below, and every entry point (a call's slow path, the
readiness kick, reset, teardown, the task keeping a value) goes through them:

    state       event                      next         side effect
    idle        call, kick                 running      start one attempt in a library task
    running     call                       running      join it (closing a cycle raises instead)
    running     attempt succeeds           ready        serve the value; wake the waiters
    running     attempt fails              failed/idle  wake the waiters with the error; failed
                                                        while cooldown= lasts, else idle
    ready       call, due for refresh      refreshing   start one refresh (not within a failed
                                                        refresh's cooldown); serve the value
    ready       ttl ends                   idle         retire the value
    refreshing  call                       refreshing   serve the value
    refreshing  refresh succeeds           ready        serve the new value; retire the old
    refreshing  refresh fails              ready        keep serving; no refresh before cooldown
    refreshing  ttl ends                   running      retire the value; calls join the refresh
    failed      call                       failed       raise the attempt's error
    failed      cooldown ends              idle         forget the error
    any         reset, eviction, teardown  idle         after work in flight settles: retire

An idle record is dropped from its store. The time rows are applied by ``_Record.advance`` when
an entry point looks at a record, and on time by the task that keeps a value with a cleanup.
A retired value's cleanup runs exactly once in the task that made it; the store lists retired
values until then, and reset and teardown await them.
"""

from __future__ import annotations

import functools
import sys
import time
import weakref
from asyncio import get_running_loop
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AsyncExitStack
from threading import get_ident
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import anyio

from ._attempts import Attempt, raise_again, wait, working
from ._errors import OnceCancelledError, OnceClosedError
from ._kinds import Kind, as_coroutine_function, invoke, kind_of
from ._logs import label, logger
from ._loops import LoopState, current_loop, drain, spawn, state_of, thread_proof
from ._policy import Policy
from ._status import OnceStatus, State, project
from ._values import Value

if TYPE_CHECKING:
    from .backends import Backend

if sys.version_info >= (3, 12):  # pragma: no cover
    from typing import ParamSpec, final
else:  # pragma: no cover
    from typing_extensions import ParamSpec, final

P = ParamSpec("P")
T = TypeVar("T")

# The clock of expiry, refresh and cooldown; a module attribute so tests can move time.
monotonic = time.monotonic

IDLE: State = "idle"
RUNNING: State = "running"
READY: State = "ready"
REFRESHING: State = "refreshing"
FAILED: State = "failed"

NOKEY: Any = type("NoKey", (), {"__repr__": lambda self: "<no key>"})()  # the unkeyed record's key

Resolve = Callable[[AsyncExitStack], Awaitable[dict[str, Any]]]


class Injector(Protocol):
    """Supplies extra keyword arguments (sub-dependencies) when a value is made."""

    param: str  # the hidden keyword argument through which a caller passes its context

    def bind(self, context: object) -> Resolve:
        """Return what resolves the keyword arguments for ``context`` (e.g. the app)."""


class _Record:
    """One key's life in one loop; all of a once's transitions (see the table above)."""

    __slots__ = ("attempt", "failure", "key", "made", "retry_at", "state", "store", "until")

    def __init__(self, store: _Store, key: Hashable) -> None:
        self.store, self.key = store, key
        self.state: State = IDLE
        self.made: Value | None = None  # the served value: set exactly in ready and refreshing
        self.attempt: Attempt | None = None  # set exactly in running and refreshing
        self.failure: tuple[BaseException, Any, BaseException | None, float] | None = None
        self.retry_at: float | None = None  # after a failed refresh: no refresh before this
        self.until: float | None = None  # the hot path serves ``made`` before this (None: ever)

    def _to(self, state: State) -> None:
        self.state, made = state, self.made
        if made is None:
            self.until = None
        elif state == REFRESHING:
            self.until = made.expires_at
        else:
            fresh = made.refresh_at
            if fresh is not None and self.retry_at is not None:
                fresh = max(fresh, self.retry_at)
            ends = [t for t in (fresh, made.expires_at) if t is not None]
            self.until = min(ends) if ends else None

    def due(self, now: float) -> State:
        """The state that time has brought this record to (the table's time rows)."""
        made, state = self.made, self.state
        if made is not None and made.expires_at is not None and now >= made.expires_at:
            return RUNNING if self.attempt is not None else IDLE
        if state == FAILED and self.failure is not None and now >= self.failure[3]:
            return IDLE
        return state

    def advance(self, now: float) -> None:
        """Apply the time rows: retire an expired value, forget an error whose cooldown ended."""
        state = self.due(now)
        if state != self.state:
            self._retire()
            self.drop() if state == IDLE else self._to(state)

    def _retire(self, now: bool = True) -> None:
        made, self.made = self.made, None
        if made is not None:
            if now:
                made.retire()
            if made.stack is not None:
                self.store.retired.append(made)

    def drop(self, now: bool = True) -> None:
        """Retire the value and forget the record (reset, eviction, teardown, time).

        With ``now=False`` the value's cleanup waits for the store's owner to start it.
        """
        self._retire(now)
        self.failure, self.attempt = None, None
        self._to(IDLE)
        if self.store.records.get(self.key) is self:
            del self.store.records[self.key]

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any], resolve: Resolve | None) -> None:
        """Start an attempt (idle -> running) or a refresh (ready -> refreshing)."""
        store = self.store
        if store.loop_state.closed:
            raise OnceClosedError(store.once.name)
        self.attempt = attempt = Attempt(label(store.once.name, self.key, unkeyed=NOKEY))
        self._to(RUNNING if self.made is None else REFRESHING)
        store.tries += 1
        logger.info(
            "%s: %s started",
            attempt.label,
            "refresh" if self.made else "attempt",
            extra={"once": store.once.name, "event": "start"},
        )
        run = functools.partial(store.once._run, self, attempt, args, kwargs, resolve)
        spawn(store.loop, run, f"fastapi_once: {attempt.label}")
        if store.once._policy.timeout is not None:
            spawn(store.loop, functools.partial(self._watch, attempt), "fastapi_once: timeout")

    async def _watch(self, attempt: Attempt) -> None:
        policy = self.store.once._policy
        with anyio.move_on_after(cast(float, policy.timeout)):
            await attempt.done.wait()
        if not attempt.settled:
            self.settle(attempt, None, policy.timed_out(attempt.label), None)
            if attempt.scope is not None:
                attempt.scope.cancel()

    def settle(
        self, attempt: Attempt, made: Value | None, error: BaseException | None, traceback: Any
    ) -> bool:
        """Deliver an attempt's outcome; apply it here if the attempt is still this record's.

        Returns False when it no longer is (timed out, reset, torn down): ``made`` must then be
        cleaned up by its maker.
        """
        if attempt.settled:
            return False
        store, mine = self.store, self.attempt is attempt
        if error is not None:
            attempt.fail(error, traceback)
            store.last_error = (type(error).__name__, str(error))
        else:
            attempt.succeed(cast(Value, made).value)
            store.last_error = None
        if not mine:
            return False
        self.attempt, now = None, monotonic()
        if error is None:
            self._retire()
            self.made, self.retry_at = made, None
            self._to(READY)
        elif self.made is not None:
            self.retry_at = store.once._policy.cooldown_until(now, error)
            self._to(READY)
        else:
            until = store.once._policy.cooldown_until(now, error)
            if until is None:
                self.drop()
                return True
            self.failure = (error, traceback, error.__context__, until)
            self._to(FAILED)
        store.evict()
        return True

    async def keep(self, made: Value) -> None:
        """Park the making task on ``made`` until it is retired; its cleanup then runs here."""

        def due() -> float | None:
            now = monotonic()
            if self.made is made and made.expires_at is not None and now >= made.expires_at:
                self.advance(now)
            if self.made is not made:
                made.retire()
                return None
            return None if made.expires_at is None else made.expires_at - now

        def abandoned() -> None:
            warned = self.store.loop_state.warned
            if self.store.once.name not in warned:
                warned.add(self.store.once.name)
                warn_left_to_loop_end(self.store.once.name)

        await made.keep(due, abandoned)


def warn_left_to_loop_end(name: str) -> None:
    """Report a value whose cleanup ran only because its event loop ended."""
    import warnings

    try:
        warnings.warn(
            f"{name}: a value was still in service when its event loop ended, so its cleanup "
            "ran at loop shutdown, not at a teardown. Use `with TestClient(app)` (not a bare "
            "TestClient(app), which runs each request in a new loop), once_lifespan, or "
            "await reset_all() before the loop ends",
            ResourceWarning,
            stacklevel=1,
        )
    except Warning:
        pass  # warnings turned into errors cannot be raised from the library's own task


class _Store:
    """What one once keeps in one event loop. Only that loop's thread touches it."""

    __slots__ = (
        "hits", "joins", "last_duration", "last_error", "loop", "loop_state", "once", "records",
        "retired", "tries",
    )  # fmt: skip

    def __init__(self, once: Once[Any, Any], loop: object, loop_state: LoopState) -> None:
        self.once, self.loop, self.loop_state = once, loop, loop_state
        self.records: OrderedDict[Hashable, _Record] = OrderedDict()  # least recent first
        self.retired: list[Value] = []  # retired values with a cleanup, until it has run
        self.hits = self.joins = self.tries = 0
        self.last_duration: float | None = None
        self.last_error: tuple[str, str] | None = None  # type name and message, no frames

    def record(self, key: Hashable, now: float) -> _Record:
        """The record of ``key`` as of ``now`` (time rows applied), created idle if absent."""
        rec = self.records.get(key)
        if rec is not None:
            rec.advance(now)  # may drop it
        if rec is None or rec.state == IDLE:
            rec = self.records[key] = _Record(self, key)
        return rec

    def evict(self) -> None:
        """Drop least recently used records, none in flight, down to ``maxsize``."""
        over = len(self.records) - self.once._maxsize
        for rec in [r for r in self.records.values() if r.attempt is None][: max(over, 0)]:
            rec.drop()

    def busy(self) -> list[Attempt]:
        return [r.attempt for r in self.records.values() if r.attempt is not None]

    def retire_all(self) -> None:
        for rec in list(self.records.values()):
            rec.drop(now=False)
        self.last_error = None

    def cleanups(self) -> list[Value]:
        self.retired = [v for v in self.retired if v.pending]
        return list(self.retired)

    def forget(self) -> list[Value]:
        kept = [r.made for r in self.records.values() if r.made is not None]
        self.records.clear()
        self.once._hot = _NOWHERE
        return [v for v in [*self.retired, *kept] if v.pending]


class _Keys:
    """A store seen through some of its keys, for a per-key reset."""

    def __init__(self, store: _Store, key: Hashable) -> None:
        self.store, self.key = store, key

    def _records(self) -> list[_Record]:
        rec = self.store.records.get(self.key)
        return [] if rec is None else [rec]

    def busy(self) -> list[Attempt]:
        return [r.attempt for r in self._records() if r.attempt is not None]

    def retire_all(self) -> None:
        for rec in self._records():
            rec.drop(now=False)

    def cleanups(self) -> list[Value]:
        return self.store.cleanups()

    def forget(self) -> list[Value]:  # pragma: no cover - teardown forgets whole stores
        return []


_NOWHERE = (object(), None, None, None)  # the hot cell before any call
_all: weakref.WeakSet[Once[Any, Any]] = weakref.WeakSet()


def registry() -> list[Once[Any, Any]]:
    """Return every once in the process, sorted by name (for readiness views and tests)."""
    return sorted(_all, key=lambda o: o.name)


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
        # A bound method is held weakly, so that a once does not keep its object alive.
        self._fn: Callable[[], Any] = (
            weakref.WeakMethod(fn) if hasattr(fn, "__self__") and hasattr(fn, "__func__")
            else lambda: fn
        )  # fmt: skip
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
        # (loop, thread proof, store, unkeyed record) of the loop that called last: the hot
        # path's one read. A tuple, so a reader in another thread never mixes two loops' parts.
        self._hot: tuple[Any, int | None, _Store | None, _Record | None] = _NOWHERE
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = getattr(fn, "__module__", None) or __name__
        self.__doc__ = getattr(fn, "__doc__", None)
        as_coroutine_function(self)
        _all.add(self)

    def __repr__(self) -> str:
        return f"<Once {self.name}>"

    @property
    def fn(self) -> Callable[..., Any]:
        """The function that makes the value.

        Raises:
            ReferenceError: it was a bound method whose object is gone.
        """
        fn = self._fn()
        if fn is None:
            raise ReferenceError(f"{self.name}: the object of this bound method no longer exists")
        return cast(Callable[..., Any], fn)

    @property
    def keyed(self) -> bool:
        """Whether the once keeps one value per key (it was made with ``key=``)."""
        return self._key is not None

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Return the value, making it first if no call in this event loop has made it yet.

        Raises:
            TypeError: arguments given to an unkeyed once, or an unhashable key.
            Exception: whatever the shared attempt raised; the next call tries again (or, within
                a ``cooldown``, fails fast with the same exception).
        """
        loop, proof, store, rec = self._hot
        # The hot path: proven the current loop without a system call where possible.
        if proof != get_ident() or loop._thread_id != proof:
            loop, proof, store, rec = self._find()
        if self._key is None:
            if (
                rec is not None
                and (made := rec.made) is not None
                and not args
                and (not kwargs or (self._param in kwargs and len(kwargs) == 1))
                and (rec.until is None or monotonic() < rec.until)
            ):
                rec.store.hits += 1
                return made.value  # type: ignore[no-any-return]
            key: Hashable = NOKEY
            if args or [k for k in kwargs if k != self._param]:
                raise TypeError(
                    f"{self.name} takes no arguments: it has no key=, so it makes one value for "
                    "every caller; pass key= to keep one value per argument"
                )
        else:
            assert store is not None
            hidden = kwargs.pop(self._param, None) if self._param is not None else None
            key = self._key(*args, **kwargs)
            try:
                rec = store.records.get(key)
            except TypeError:
                raise self._unhashable(key, args, kwargs) from None
            if (
                rec is not None
                and (made := rec.made) is not None
                and (rec.until is None or monotonic() < rec.until)
            ):
                store.records.move_to_end(key)
                store.hits += 1
                return made.value  # type: ignore[no-any-return]
            if hidden is not None:
                kwargs[self._param] = hidden  # type: ignore[index]
        return cast(T, await self._slow(cast(_Store, store), key, args, kwargs))

    def _find(self) -> tuple[Any, int | None, _Store, _Record | None]:
        try:
            loop: object = get_running_loop()
        except RuntimeError:
            loop = current_loop()
        hot = self._hot
        if hot[0] is loop:
            return cast(tuple[Any, int | None, _Store, _Record | None], hot)
        state = state_of(loop)
        store = state.stores.get(self)
        if store is None:
            store = state.stores[self] = _Store(self, loop, state)
        self._hot = (loop, thread_proof(loop), store, store.records.get(NOKEY))
        return self._hot  # type: ignore[return-value]

    def _existing_store(self) -> _Store | None:
        """The running loop's store (or, outside any loop, the last one used), if any."""
        try:
            loop = current_loop()
        except RuntimeError:
            return self._hot[2]
        state = state_of(loop)
        return cast("_Store | None", state.stores.get(self))

    def _unhashable(self, key: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TypeError:
        import inspect

        bound = inspect.signature(self.fn).bind_partial(*args, **kwargs).arguments
        culprits = [name for name, value in bound.items() if not _hashable(value)]
        where = f" (parameter {', '.join(map(repr, culprits))})" if culprits else ""
        return TypeError(
            f"the key of {self.name} is an unhashable {type(key).__name__}{where}; pass key= a "
            "function that returns a hashable value, e.g. key=lambda items: tuple(items)"
        )

    async def _slow(
        self, store: _Store, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        context = kwargs.pop(self._param, None) if self._param is not None else None
        now = monotonic()
        rec = store.record(key, now)
        if key is NOKEY:
            self._hot = (store.loop, thread_proof(store.loop), store, rec)
        if rec.made is not None:
            due = rec.made.refresh_at
            if rec.state == READY and due is not None and now >= due:
                if rec.retry_at is None or now >= rec.retry_at:
                    rec.start(args, kwargs, self._bind(context))
            store.hits += 1
            if key is not NOKEY:
                store.records.move_to_end(key)
            return rec.made.value
        if rec.failure is not None:
            raise_again(*rec.failure[:3])
        if rec.attempt is None:
            try:
                rec.start(args, kwargs, self._bind(context))
            except OnceClosedError:
                rec.drop()
                raise
        else:
            store.joins += 1
        attempt = cast(Attempt, rec.attempt)
        await wait(attempt)
        return attempt.result()

    def _bind(self, context: object) -> Resolve | None:
        return None if self._injector is None else self._injector.bind(context)

    async def _run(
        self,
        rec: _Record,
        attempt: Attempt,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        resolve: Resolve | None,
    ) -> None:
        """Make the value in the library's task, settle ``attempt``, keep the value; never raises."""
        working.set(attempt)
        store, started = rec.store, monotonic()
        with anyio.CancelScope() as attempt.scope:
            make = functools.partial(self._make, args, kwargs, resolve)
            try:
                value, stack = await self._policy.run(attempt.label, make)
            except BaseException as exc:
                store.last_duration = monotonic() - started
                error, traceback = exc, exc.__traceback__
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    error, traceback = OnceCancelledError(attempt.label), None
                    error.__cause__ = exc
                if rec.settle(attempt, None, error, traceback):
                    refresh = rec.made is not None
                    logger.warning(
                        "%s: %s failed after %.2f s with %s%s",
                        attempt.label,
                        "refresh" if refresh else "attempt",
                        store.last_duration,
                        type(error).__name__,
                        "; keeping the current value" if refresh else "",
                        extra={"once": self.name, "event": "failed"},
                    )
                    logger.debug("%s: failure", attempt.label, exc_info=error)
                return
            now = monotonic()
            made = Value(attempt.label, value, stack, now, time.time(), self._policy.deadlines(now))
            store.last_duration = now - started
            refresh = rec.state == REFRESHING
            if not rec.settle(attempt, made, None, None):
                await made.clean_here()  # made too late: nobody can get it
                return
            logger.info(
                "%s: %s in %.2f s",
                attempt.label,
                "refreshed" if refresh else "ready",
                store.last_duration,
                extra={"once": self.name, "event": "ready"},
            )
            if stack is not None:
                await rec.keep(made)

    async def _make(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], resolve: Resolve | None
    ) -> tuple[Any, AsyncExitStack | None]:
        """One try: resolve sub-dependencies, call fn (through the backend, if any)."""
        stack = AsyncExitStack() if self._needs_stack else None
        try:
            if resolve is not None:
                assert stack is not None
                kwargs = {**kwargs, **await resolve(stack)}
            make = functools.partial(
                invoke,
                self.fn,
                self._kind,
                args,
                kwargs,
                stack,
                self.name,
                abandon_on_cancel=self._across is not None,
            )
            if self._across is None:
                value = await make()
            else:
                value = await self._across.run_once(self.name, make, ttl=self._policy.ttl)
        except BaseException:
            if stack is not None:
                # Release what the failed try had set up; the waiters get the try's own
                # exception, not one of its cleanup.
                with anyio.CancelScope(shield=True):
                    try:
                        await stack.aclose()
                    except BaseException:  # noqa: S110 - the try's own error wins
                        pass
            raise
        return value, stack

    async def reset(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Clean up and forget this once's value(s) in the running event loop.

        With arguments (a keyed once), only the key they map to. Work in flight is awaited first
        and what it makes is cleaned up too; a failure's cooldown and the last error are
        forgotten; the counters in :meth:`status` are kept. With ``across=``, the backend's
        record is cleared too, so the next call in any process runs the function again.

        Raises:
            TypeError: arguments given to an unkeyed once.
            OnceCycleError: called from inside the work it would wait for.
            Exception: what a cleanup raised, after every cleanup has run.
        """
        if (args or kwargs) and self._key is None:
            raise TypeError(f"{self.name}.reset() takes arguments only for a keyed once")
        store = self._existing_store()
        try:
            if store is not None:
                view = store if not (args or kwargs) else _Keys(store, self._key(*args, **kwargs))  # type: ignore[misc]
                await drain(lambda: [view], f"{self.name}.reset()")
        finally:
            if self._across is not None:
                await self._across.reset(self.name)

    def status(self, *, details: bool = False) -> OnceStatus:
        """Return a snapshot of this once in the running event loop (or the last one used).

        Args:
            details: include the last error's message (off by default: it can hold secrets).
        """
        store = self._existing_store()
        if store is None:
            return OnceStatus(name=self.name, state=IDLE)
        now = monotonic()
        records = list(store.records.values())
        return project(
            self.name,
            self.keyed,
            [(r.due(now), None if r.made is None else r.made.wall_time) for r in records],
            store.last_error,
            details,
            attempts=store.tries,
            hits=store.hits,
            joins=store.joins,
            last_duration=store.last_duration,
        )


def kick(target: Once[Any, Any], context: object) -> bool:
    """Start making an unkeyed once's value in the background unless it is there or on its way.

    Returns whether an attempt was started. For readiness probes: nothing waits.
    """
    store = target._find()[2]
    rec = store.record(NOKEY, monotonic())
    if rec.state != IDLE:
        return False
    try:
        rec.start((), {}, target._bind(context))
    except OnceClosedError:
        rec.drop()
        return False
    return True


def pin(target: Once[Any, T], value: T) -> None:
    """Serve ``value`` from an unkeyed once in the running loop until :func:`unpin` (tests)."""
    rec = target._find()[2].record(NOKEY, monotonic())
    rec.made = Value(target.name, value, None, monotonic(), time.time(), (None, None))
    rec._to(READY)


def unpin(target: Once[Any, T], value: T) -> None:
    """Stop serving a pinned ``value`` (nothing is cleaned up: it belongs to the caller)."""
    store = target._existing_store()
    rec = None if store is None else store.records.get(NOKEY)
    if rec is not None and rec.made is not None and rec.made.value is value:
        rec.made = None
        rec.drop()


async def make_with(target: Once[Any, T], context: object) -> T:
    """Return an unkeyed once's value, making it with ``context`` (e.g. the app) if needed."""
    kwargs: dict[str, Any] = {target._param: context} if target._param is not None else {}
    call: Any = target
    return cast(T, await call(**kwargs))


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _forget_hot_cells() -> None:
    # A forked child has none of its parent's loops running: no cell may prove one.
    for item in list(_all):
        item._hot = _NOWHERE


import os  # noqa: E402

os.register_at_fork(after_in_child=_forget_hot_cells)
