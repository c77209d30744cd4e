"""The single-flight primitive: make a value once per event loop and share it with every caller.

This module knows nothing of FastAPI; it depends on anyio (and, under trio, on trio) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import inspect
import logging
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Hashable, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import anyio
import anyio.to_thread

from ._errors import OnceCancelledError, OnceCycleError

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


# --- event loops and the tasks the library owns ---------------------------------------------------


def current_loop() -> object:
    """Return an object that identifies the running event loop (asyncio loop or trio token)."""
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


# asyncio keeps only weak references to tasks: these strong ones keep the library's work alive
# after every caller has left.
_tasks: set[asyncio.Task[None]] = set()


def spawn(loop: object, fn: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``fn()`` in a task owned by the library, not by the caller, in the caller's context."""
    if isinstance(loop, asyncio.AbstractEventLoop):

        async def main() -> None:
            await fn()

        task = loop.create_task(main(), name=name)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    else:
        import trio

        # A system task lives as long as the run, belongs to no request, and must never raise:
        # every fn passed here catches what it does not deliver to its waiters.
        trio.lowlevel.spawn_system_task(fn, name=name, context=contextvars.copy_context())


# --- kinds of functions ---------------------------------------------------------------------------


class Kind(enum.Enum):
    """How a function makes its value."""

    ASYNC = "async def"
    SYNC = "def"
    ASYNC_GEN = "async generator"
    GEN = "generator"


def kind_of(call: Callable[..., Any]) -> Kind:
    """Tell how ``call`` makes its value, seeing through partials and callable instances."""
    target: Any = call
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isroutine(target) or inspect.isclass(target)):
        target = getattr(target, "__call__", target)  # noqa: B004
    if inspect.isasyncgenfunction(target):
        return Kind.ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return Kind.GEN
    if inspect.iscoroutinefunction(target) or isinstance(call, Once):
        return Kind.ASYNC
    return Kind.SYNC


async def invoke(
    call: Callable[..., Any],
    kind: Kind,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    stack: AsyncExitStack | None,
    name: str,
) -> Any:
    """Make a value with ``call``; a generator's code after its ``yield`` goes on ``stack``.

    A ``def`` (and a generator's steps) runs in a worker thread, never on the event loop.
    """
    if kind is Kind.ASYNC:
        return await call(*args, **kwargs)
    if kind is Kind.SYNC:
        return await anyio.to_thread.run_sync(functools.partial(call, *args, **kwargs))
    assert stack is not None, "a generator needs a stack for its cleanup"
    if kind is Kind.ASYNC_GEN:
        agen: AsyncGenerator[Any, None] = call(*args, **kwargs)
        try:
            value = await agen.__anext__()
        except StopAsyncIteration:
            raise RuntimeError(f"{name} returned without yielding a value") from None
        stack.push_async_callback(_finish_async_gen, agen, name)
        return value
    gen: Generator[Any, None, None] = call(*args, **kwargs)
    yielded, value = await anyio.to_thread.run_sync(_step, gen)
    if not yielded:
        raise RuntimeError(f"{name} returned without yielding a value")
    stack.push_async_callback(_finish_gen, gen, name)
    return value


def _step(gen: Generator[Any, None, None]) -> tuple[bool, Any]:
    # StopIteration must not cross a coroutine boundary, so it is turned into a flag here.
    try:
        return True, next(gen)
    except StopIteration:
        return False, None


async def _finish_async_gen(agen: AsyncGenerator[Any, None], name: str) -> None:
    try:
        await agen.__anext__()
    except StopAsyncIteration:
        return
    await agen.aclose()
    raise RuntimeError(f"{name} yielded more than once; a once's generator must yield exactly once")


async def _finish_gen(gen: Generator[Any, None, None], name: str) -> None:
    yielded, _ = await anyio.to_thread.run_sync(_step, gen)
    if yielded:
        gen.close()
        raise RuntimeError(
            f"{name} yielded more than once; a once's generator must yield exactly once"
        )


# --- state ----------------------------------------------------------------------------------------

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
    """A value a once made, with the cleanup (if any) that runs when it is forgotten."""

    __slots__ = ("key", "once", "stack", "value")

    def __init__(
        self, once: Once[Any, Any], key: Hashable, value: Any, stack: AsyncExitStack | None
    ):
        self.once = once
        self.key = key
        self.value = value
        self.stack = stack


class _Loop:
    """What the onces keep for one event loop. Only that loop's thread touches it."""

    __slots__ = ("made", "states")

    def __init__(self) -> None:
        self.states: dict[Once[Any, Any], _State] = {}
        # Every value made in this loop and not forgotten yet, in order of creation.
        self.made: dict[_Made, None] = {}


class _State:
    """What one once keeps for one event loop. Only that loop's thread touches it."""

    __slots__ = ("attempts", "made", "registry", "values")

    def __init__(self, registry: _Loop) -> None:
        self.registry = registry
        self.made: _Made | None = None  # the value of an unkeyed once
        self.values: OrderedDict[Hashable, _Made] = OrderedDict()  # keyed: least recent first
        self.attempts: dict[Hashable, _Attempt] = {}  # in flight, by key (None when unkeyed)

    def forget(self, made: _Made) -> None:
        if self.made is made:
            self.made = None
        elif self.values.get(made.key) is made:
            del self.values[made.key]
        self.registry.made.pop(made, None)


# Weak keys: a closed and dropped loop takes its state with it.
_loops: weakref.WeakKeyDictionary[object, _Loop] = weakref.WeakKeyDictionary()
_loops_lock = threading.Lock()


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
                logger.error("cleanup of %s failed", item.once.name, exc_info=exc)
                errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise BaseExceptionGroup("cleanup of several once values failed", errors)


async def _cleanup_evicted(made: _Made) -> None:
    # Logged by _cleanup; a library task must not raise.
    with contextlib.suppress(BaseException):
        await _cleanup([made])


async def reset_all() -> None:
    """Clean up and forget every value made in the running event loop, newest first.

    In-flight attempts are awaited first, so what they make is cleaned up too. Each cleanup runs
    exactly once, shielded from cancellation; the next call of any once makes its value anew.

    Raises:
        Exception: the cleanup's exception, after every other cleanup has run (a
            ``BaseExceptionGroup`` when several failed).
    """
    registry = _loops.get(current_loop())
    if registry is None:
        return
    pending = [a for state in registry.states.values() for a in state.attempts.values()]
    for attempt in pending:
        await attempt.done.wait()
    made = list(registry.made)
    for item in made:
        registry.states[item.once].forget(item)
    await _cleanup(reversed(made))


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
    attempt, and once the value exists a call is a dictionary look-up. A failed attempt is shared
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
        self._param = injector.param if injector is not None else None
        self._needs_stack = injector is not None or self._kind in (Kind.ASYNC_GEN, Kind.GEN)
        # (loop, state) of the loop that called last: the hot path's one-read cache. A tuple so
        # that a reader in another thread never pairs one loop with another loop's state.
        self._last: tuple[object, _State] = _NO_STATE
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = getattr(fn, "__module__", None) or __name__
        self.__doc__ = getattr(fn, "__doc__", None)
        if sys.version_info >= (3, 12):  # pragma: no cover
            inspect.markcoroutinefunction(self)

    def __repr__(self) -> str:
        return f"<Once {self.name}>"

    @property
    def keyed(self) -> bool:
        """Whether the once keeps one value per key (it was made with ``key=``)."""
        return self._key is not None

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Return the value, making it first if no call in this event loop has made it yet.

        Raises:
            Exception: whatever the shared attempt raised; the next call tries again.
            OnceCycleError: the value is being made by a chain of calls that awaits it.
            OnceCancelledError: the attempt was cancelled from inside.
        """
        loop = current_loop()
        last = self._last
        state = last[1] if last[0] is loop else self._state_for(loop)
        if self._key is None:
            made = state.made
            if made is not None:
                return made.value  # type: ignore[no-any-return]
            return await self._join(loop, state, None, args, kwargs)  # type: ignore[no-any-return]
        context = kwargs.pop(self._param, None) if self._param is not None else None
        key = self._key(*args, **kwargs)
        try:
            made = state.values.get(key)
        except TypeError:
            raise self._unhashable(key, args, kwargs) from None
        if made is not None:
            state.values.move_to_end(key)
            return made.value  # type: ignore[no-any-return]
        if self._param is not None:
            kwargs[self._param] = context
        return await self._join(loop, state, key, args, kwargs)  # type: ignore[no-any-return]

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

    def _unhashable(self, key: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TypeError:
        bound = inspect.signature(self.fn).bind_partial(*args, **kwargs).arguments
        culprits = [name for name, value in bound.items() if not _hashable(value)]
        where = f" (parameter {', '.join(map(repr, culprits))})" if culprits else ""
        return TypeError(
            f"the key of {self.name} is an unhashable {type(key).__name__}{where}; pass key= a "
            "function that returns a hashable value, e.g. key=lambda items: tuple(items)"
        )

    async def _join(
        self,
        loop: object,
        state: _State,
        key: Hashable,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        context = kwargs.pop(self._param, None) if self._param is not None else None
        if self._key is None and (args or kwargs):
            raise TypeError(
                f"{self.name} takes no arguments: it has no key=, so it makes one value for "
                "every caller; pass key= to keep one value per argument"
            )
        me = _working.get()
        attempt = state.attempts.get(key)
        if attempt is None:
            label = self.name if self._key is None else f"{self.name}[{key!r}]"
            attempt = state.attempts[key] = _Attempt(label)
            work = functools.partial(self._run, state, key, attempt, args, kwargs, context)
            spawn(loop, work, name=f"fastapi_once: {label}")
        elif me is not None:
            # attempt -> ... -> me already wait on each other; me waiting on attempt would close
            # the loop, and nothing in it could ever finish.
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

    async def _run(
        self,
        state: _State,
        key: Hashable,
        attempt: _Attempt,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: object,
    ) -> None:
        """Make the value in the library's task and settle ``attempt``; never raises."""
        _working.set(attempt)
        stack = AsyncExitStack() if self._needs_stack else None
        try:
            try:
                if self._injector is not None:
                    assert stack is not None
                    kwargs = {**kwargs, **await self._injector(context, stack)}
                make = functools.partial(
                    invoke, self.fn, self._kind, args, kwargs, stack, self.name
                )
                if self._across is None:
                    value = await make()
                else:
                    value = await self._across.run_once(self.name, make)
            except BaseException:
                if stack is not None:
                    # What the failed attempt had set up is released; its errors are logged, and
                    # the waiters get the attempt's own exception.
                    with contextlib.suppress(BaseException):
                        await _cleanup([_Made(self, key, None, stack)])
                raise
        except BaseException as exc:
            # Forget the failed attempt before waking its waiters, so that any of them that calls
            # again starts a fresh attempt instead of joining this one.
            del state.attempts[key]
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                error: BaseException = OnceCancelledError(attempt.label)
                error.__cause__ = exc
                attempt.error = error
            else:
                attempt.error, attempt.traceback = exc, exc.__traceback__
            attempt.done.set()
            return
        made = _Made(self, key, value, stack)
        del state.attempts[key]
        state.registry.made[made] = None
        if self._key is None:
            state.made = made
        else:
            state.values[key] = made
            if len(state.values) > self._maxsize:
                _, evicted = state.values.popitem(last=False)
                del state.registry.made[evicted]
                if evicted.stack is not None:
                    spawn(
                        current_loop(),
                        functools.partial(_cleanup_evicted, evicted),
                        name=f"fastapi_once: cleanup {self.name}",
                    )
        attempt.value = value
        attempt.done.set()

    async def reset(self) -> None:
        """Clean up and forget this once's value(s) in the running event loop.

        An attempt in flight is awaited first and its value cleaned up too. The next call runs
        the function again.

        Raises:
            Exception: what a cleanup raised, after every cleanup has run.
        """
        loop = current_loop()
        registry = _loops.get(loop)
        state = registry.states.get(self) if registry is not None else None
        if state is None:
            return
        for attempt in list(state.attempts.values()):
            await attempt.done.wait()
        made = [state.made] if state.made is not None else list(state.values.values())
        for item in made:
            state.forget(item)
        await _cleanup(reversed(made))

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
