"""Calling any kind of function — async def, def, async generator, generator — for its value."""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.to_thread

from ._telemetry import error_type, fields

logger = logging.getLogger("fastapi_once")


class Kind(enum.Enum):
    """How a function makes its value."""

    ASYNC = "async def"
    SYNC = "def"
    ASYNC_GEN = "async generator"
    GEN = "generator"


def kind_of(call: Callable[..., Any]) -> Kind:
    """Tell how ``call`` makes its value, seeing through wrappers.

    Partials, ``staticmethod``/``classmethod`` objects, bound methods, decorators that set
    ``__wrapped__`` (``functools.wraps``) and callable instances are looked through.
    """
    target: Any = call
    while True:
        if isinstance(target, (functools.partial, functools.partialmethod)):
            target = target.func
        elif isinstance(target, (staticmethod, classmethod)) or inspect.ismethod(target):
            target = target.__func__
        elif getattr(target, "__wrapped__", None) is not None and not _marked(target):
            target = target.__wrapped__
        elif callable(target) and not (inspect.isroutine(target) or inspect.isclass(target)):
            nxt = type(target).__call__
            if nxt is target or _marked(target):
                break
            target = nxt
        else:
            break
    if inspect.isasyncgenfunction(target):
        return Kind.ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return Kind.GEN
    if _marked(target) or inspect.iscoroutinefunction(target):
        return Kind.ASYNC
    return Kind.SYNC


def _marked(target: object) -> bool:
    """Whether ``target`` is marked as a coroutine function without being one (3.12's marker)."""
    return getattr(target, "_is_coroutine_marker", None) is not None


async def _coroutine_template() -> None:  # pragma: no cover - never called
    """Lends its code object's coroutine flag to :func:`as_coroutine_function`."""


def as_coroutine_function(obj: Any) -> None:
    """Make ``inspect`` and ``asyncio`` see the callable instance ``obj`` as a coroutine function.

    Python 3.12+ has ``inspect.markcoroutinefunction``. Before it, ``inspect`` accepts any
    function-like object whose ``__code__`` carries the coroutine flag, and ``asyncio`` also
    checks the ``_is_coroutine`` marker.
    """
    if sys.version_info >= (3, 12):  # pragma: no cover
        inspect.markcoroutinefunction(obj)
        return
    import asyncio.coroutines  # pragma: no cover

    obj.__code__ = _coroutine_template.__code__  # pragma: no cover
    obj.__defaults__ = obj.__kwdefaults__ = None  # pragma: no cover
    obj._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]  # pragma: no cover


async def invoke(
    call: Callable[..., Any],
    kind: Kind,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    stack: AsyncExitStack | None,
    name: str,
    *,
    abandon_on_cancel: bool = False,
) -> Any:
    """Make a value with ``call``; a generator's code after its ``yield`` goes on ``stack``.

    A ``def`` (and a generator's steps) runs in a worker thread, never on the event loop. With
    ``abandon_on_cancel`` a cancelled caller stops waiting for the thread (which runs on).
    """
    if kind is Kind.ASYNC:
        return await call(*args, **kwargs)
    if kind is Kind.SYNC:
        # Boxed in a tuple, so that trio accepts a coroutine as the thread's result: a wrapper
        # that hides an async def (no __wrapped__) returns one, and it is awaited here.
        (value,) = await anyio.to_thread.run_sync(
            lambda: (call(*args, **kwargs),), abandon_on_cancel=abandon_on_cancel
        )
        return await value if inspect.iscoroutine(value) else value
    assert stack is not None, "a generator needs a stack for its cleanup"
    if kind is Kind.ASYNC_GEN:
        agen: AsyncGenerator[Any, None] = call(*args, **kwargs)
        try:
            value = await agen.__anext__()
        except StopAsyncIteration:
            raise RuntimeError(f"{name} returned without yielding a value") from None
        stack.push_async_callback(_finish_async_gen, agen, name)
        return value
    first = _FirstStep(call(*args, **kwargs), name)
    try:
        yielded, value = await anyio.to_thread.run_sync(
            first.run, abandon_on_cancel=abandon_on_cancel
        )
    except BaseException:
        first.abandon()
        raise
    gen = first.gen
    if not yielded:
        raise RuntimeError(f"{name} returned without yielding a value")
    stack.push_async_callback(_finish_gen, gen, name)
    return value


class _FirstStep:
    """A sync generator's first step, in a worker thread, handed over to whoever still waits.

    If the waiting task stops waiting (a cancellation that went through, as when asyncio's loop
    ends), the generator is finished where it is: the thread runs its cleanup, so a value made
    for nobody is still cleaned up. ``_lock`` guards ``_state``.
    """

    def __init__(self, gen: Generator[Any, None, None], name: str) -> None:
        self.gen, self.name = gen, name
        self._lock = threading.Lock()
        self._state = "running"  # then "stepped" (result handed over) or "abandoned"

    def run(self) -> tuple[bool, Any]:
        yielded, value = _step(self.gen)
        with self._lock:
            if self._state == "running":
                self._state = "stepped"
                return yielded, value
        if yielded:
            _finish_here(self.gen, self.name)
        return False, None

    def abandon(self) -> None:
        """The waiter is gone: the thread finishes the generator (or, if it has, a new one)."""
        with self._lock:
            state, self._state = self._state, "abandoned"
        if state == "stepped":  # stepped, but the value never reached the waiter
            threading.Thread(target=_finish_here, args=(self.gen, self.name), daemon=True).start()


def _finish_here(gen: Generator[Any, None, None], name: str) -> None:
    """Run a sync generator's cleanup in this thread; its failure can only be logged."""
    try:
        if _step(gen)[0]:
            gen.close()
    except BaseException as exc:
        kind = error_type(exc)
        logger.error(
            "%s: cleanup failed with %s",
            name,
            kind,
            extra=fields(name, "cleanup_failed", error_type=kind),
        )


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
