"""Event loops: which one is running, the tasks the library owns in it, and its teardown.

Each event loop has a :class:`LoopState` holding every once's store for that loop. Locking:
``_lock`` guards only the ``_states`` mapping (any thread may look up its loop); a
``LoopState`` and everything in it is touched only by its own loop's thread, so it has no lock.

The process scope has a loop of its own: one asyncio loop in a daemon thread, started on first
use, where ``scope="process"`` onces keep their values so that every loop and thread of the
process shares them. Other loops reach it with :func:`hop`, sync code with :func:`call_blocking`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import logging
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from ._attempts import Attempt, check_wait, wait, working
from ._perloop import forget_all, left_to_loop_end, torn_down
from ._telemetry import carry, error_type, fields
from ._values import Value, raise_all

logger = logging.getLogger("fastapi_once")

T = TypeVar("T")


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


def thread_proof(loop: object) -> int | None:
    """The thread id that proves ``loop`` is the running loop, where a cheap proof exists.

    An asyncio ``BaseEventLoop`` records the thread that runs it, and a thread runs at most one
    loop at a time: while ``loop._thread_id == threading.get_ident()``, ``loop`` is the running
    loop, with no system call (``get_running_loop()`` calls ``getpid()`` before Python 3.12).
    None for loops without that record (uvloop, trio): the caller asks the slow way.
    """
    if isinstance(loop, asyncio.BaseEventLoop):
        return threading.get_ident()
    return None


class Event(Protocol):
    """An event of the running loop's own library (asyncio or trio)."""

    def set(self) -> object:
        """Wake every waiter."""

    def is_set(self) -> bool:
        """Whether it is set."""

    async def wait(self) -> object:
        """Wait until it is set."""


def new_event(loop: object) -> Event:
    """An event for ``loop``: its library's own, without anyio's per-event dispatch."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        return asyncio.Event()
    import trio

    return trio.Event()


class Drainable(Protocol):
    """What a once keeps in one event loop, as teardown sees it."""

    def busy(self) -> list[Attempt]:
        """The attempts in flight."""

    def retire_all(self) -> None:
        """Take every value out of service and forget every record (nothing in flight).

        The values' cleanups wait in :meth:`cleanups` for the caller to start them.
        """

    def cleanups(self) -> list[Value]:
        """The values out of service whose cleanup has not finished."""

    def forget(self) -> list[Value]:
        """Forget everything without waiting (the loop is gone); return what is not cleaned up."""


class LoopState:
    """What the onces keep for one event loop. Only that loop's thread touches it."""

    __slots__ = ("__weakref__", "closed", "stores", "warned")

    def __init__(self) -> None:
        self.stores: dict[Any, Drainable] = {}  # by once
        # Set when once_lifespan shuts down: new attempts are refused, so nothing is made that
        # the teardown would miss. Cleared when a lifespan starts again in this loop.
        self.closed = False
        self.warned: set[str] = set()  # onces already reported for values left to loop end

    def report_left_to_loop_end(self, name: str) -> None:
        """Warn, once per once and loop, that a value was cleaned up only as its loop ended."""
        if name in self.warned:
            return
        self.warned.add(name)
        left_to_loop_end(name)


_states: weakref.WeakKeyDictionary[object, LoopState] = weakref.WeakKeyDictionary()
# Reentrant: a collection that runs inside it may call a weakref callback that reads the
# states (a collected instance's once forgets its values, see _methods).
_lock = threading.RLock()


def state_of(loop: object) -> LoopState:
    """Return ``loop``'s state, creating it on first use (any thread)."""
    with _lock:
        state = _states.get(loop)
        if state is None:
            state = _states[loop] = LoopState()
        return state


def every_state() -> list[LoopState]:
    """A snapshot of every live loop's state (any thread; each is read at the reader's risk)."""
    with _lock:
        return list(_states.values())


def running_state() -> LoopState | None:
    """Return the running loop's state if any once has used it, else None."""
    return _states.get(current_loop())


async def drain(
    stores: Callable[[], Iterable[Drainable]],
    action: str,
    timeout: float = math.inf,  # noqa: ASYNC109 - bounds one phase, not the whole call
) -> list[Attempt]:
    """Settle work in flight, retire every value and await every cleanup; repeat until none left.

    Repeating catches what work in flight made meanwhile, so nothing made before ``drain``
    returns escapes it. Past ``timeout`` seconds it stops waiting for work in flight (which
    cleans up what it makes as soon as it settles), cleans up the rest, and returns the
    attempts it left. Cleanups are always awaited.

    Raises:
        OnceCycleError: called from inside the work it would wait for.
        Exception: what a cleanup raised, after every cleanup has run.
    """
    errors: list[BaseException] = []
    deadline = anyio.current_time() + timeout
    left: list[Attempt] = []
    while True:
        busy = [attempt for store in stores() for attempt in store.busy()]
        for attempt in busy:
            check_wait(attempt, action)
        if busy and not left:
            with anyio.move_on_after(deadline - anyio.current_time()):
                for attempt in busy:
                    await wait(attempt, action)
                continue
            left = busy
        for store in stores():
            store.retire_all()
        pending = [value for store in stores() for value in store.cleanups()]
        if not pending:
            break
        try:
            for value in sorted(pending, key=lambda v: v.serial, reverse=True):  # newest first
                value.retire()
                assert value.node is not None
                await wait(value.node, action)
                errors.extend(value.take_errors())
        finally:
            for value in pending:  # cancelled or failed half-way: the rest go on their own
                value.retire()
    raise_all(errors)
    return left


async def reset_all() -> None:
    """Clean up and forget every value made in the running event loop.

    Attempts in flight are awaited first and what they make is cleaned up too; it repeats until
    nothing is left. Each cleanup runs exactly once, shielded from cancellation; the next call of
    any once makes its value anew.

    Raises:
        OnceCycleError: called from inside a once's function that it would wait for.
        Exception: the cleanup's exception, after every other cleanup has run (a
            ``BaseExceptionGroup`` when several failed).
    """
    state = running_state()
    if state is not None:
        await drain(lambda: list(state.stores.values()), "reset_all()")
        torn_down(current_loop())


async def close(timeout: float) -> None:  # noqa: ASYNC109 - a bound, not the caller's deadline
    """Tear down the running loop's onces for good: refuse new attempts, then drain, shielded.

    Waits at most ``timeout`` seconds for work in flight; what is still running then is logged
    and left to finish (what it makes is cleaned up as soon as it settles).
    """
    loop = current_loop()
    state = state_of(loop)
    state.closed = True
    with anyio.CancelScope(shield=True):
        left = await drain(lambda: list(state.stores.values()), "shutdown", timeout)
    torn_down(loop)
    if left:
        logger.warning(
            "shutdown stopped waiting after %.1f s; still running: %s",
            timeout,
            ", ".join(attempt.label for attempt in left),
            extra=fields(None, "shutdown_timeout", duration_s=timeout),
        )


def forget_everything() -> None:
    """Forget every once's values in every event loop; run cleanups that never ran.

    For test teardown, outside any event loop: cleanup errors are logged, not raised. A value's
    cleanup normally runs in the task that made it, also when its loop ends; one whose loop was
    closed without cancelling its tasks is cleaned up here, in a fresh loop. The process scope
    is reset in its own loop, waiting at most ``PROCESS_EXIT_TIMEOUT`` for work in flight.

    Raises:
        RuntimeError: an event loop is running in this thread (use ``await reset_all()``).
    """
    try:
        current_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("forget_everything() runs outside event loops; use await reset_all()")
    here = _process_loop
    if here is not None:
        with contextlib.suppress(BaseException):  # a cleanup's error: logged by the cleanup
            call_blocking(_reset_process_scope)
    with _lock:
        states = [state for loop, state in _states.items() if loop is not here]
        _states.clear()
        if here is not None and (kept := _process_state) is not None:
            _states[here] = kept
    forget_all()
    orphans = [v for s in states for store in s.stores.values() for v in store.forget()]
    if orphans:
        with contextlib.suppress(BaseException):
            anyio.run(_clean_orphans, orphans)


async def _reset_process_scope() -> None:
    # Like reset_all() in the process scope's loop, but a hung function cannot hang the caller.
    state = state_of(current_loop())
    await drain(lambda: list(state.stores.values()), "forget_everything()", PROCESS_EXIT_TIMEOUT)


async def _clean_orphans(values: list[Value]) -> None:
    for value in values:
        await value.clean_here()


# --- the process scope's loop ---------------------------------------------------------------------

# The loop, its thread's id and its state; set together under _process_lock, read without it
# (a reader that sees None starts the loop under the lock, which checks again).
_process_loop: asyncio.AbstractEventLoop | None = None
_process_thread: int | None = None
_process_state: LoopState | None = None
_process_lock = threading.Lock()
_exited = False  # set under _process_lock once the exit handler has closed the process scope

#: Seconds the interpreter's exit waits for process-scope work in flight before cleaning up.
PROCESS_EXIT_TIMEOUT = 10.0


def process_loop() -> asyncio.AbstractEventLoop:
    """Return the process scope's loop, starting its thread on first use.

    Raises:
        RuntimeError: the interpreter is exiting and the process scope is already closed.
    """
    global _process_loop, _process_thread, _process_state
    loop = _process_loop
    if loop is not None:
        return loop
    with _process_lock:
        if _exited:
            raise RuntimeError(
                "the process scope is closed: the interpreter is exiting and its values were "
                "cleaned up; use process-scope onces before exit handlers run"
            )
        if _process_loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="fastapi_once process scope", daemon=True)
            thread.start()
            started.wait()
            _process_thread, _process_state = thread.ident, state_of(loop)
            _process_loop = loop
        return _process_loop


def in_process_loop() -> bool:
    """Whether this thread runs the process scope's loop."""
    return threading.get_ident() == _process_thread


async def hop(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work()`` in the process scope's loop and await it from the running loop.

    The running loop keeps running meanwhile. Cancelling the caller cancels ``work`` (a caller
    of a once that leaves, which never cancels the once's attempt for others).
    """
    done = _submit(work)
    caller = current_loop()
    if isinstance(caller, asyncio.AbstractEventLoop):
        return _unwrap(await asyncio.wrap_future(done))  # its cancellation cancels ``done``
    import trio

    woken = trio.Event()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            caller.run_sync_soon(woken.set)  # type: ignore[attr-defined]

    done.add_done_callback(wake)
    try:
        await woken.wait()
    except BaseException:
        done.cancel()
        raise
    return _unwrap(done.result())


def refuse_in_loop(action: str) -> None:
    """Refuse a call that may block its thread where an event loop runs.

    Raises:
        RuntimeError: an event loop runs in this thread (it would stall; in the process scope's
            own thread, it would wait for itself).
    """
    try:
        current_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{action} blocks its thread, and an event loop runs in this one; await the once "
        "instead (or call this from a worker thread, e.g. in a def route)"
    )


def call_blocking(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work()`` in the process scope's loop, blocking this thread until it ends.

    Call :func:`refuse_in_loop` first: in a thread with a running loop this would stall it.
    """
    if working.get() is None:  # not a once's function: it holds no worker thread of a loop
        return _unwrap(_submit(work).result())
    return _unwrap(_submit(lambda: _lending(work)).result())


async def _lending(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # A once's def fn blocked here lends the loop a worker-thread token while it waits: it holds
    # a worker thread, and a burst of such fns would otherwise take every token (anyio's default
    # is 40) and wait for ever for a fn that needs one.
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens += 1
    try:
        return await work()
    finally:
        limiter.total_tokens -= 1


def run_in_process_loop(action: Callable[[], T]) -> T:
    """Call ``action`` in the process scope's loop thread and return its result."""
    if in_process_loop():
        return action()
    result: concurrent.futures.Future[T] = concurrent.futures.Future()

    def call() -> None:
        try:
            result.set_result(action())
        except BaseException as exc:
            result.set_exception(exc)

    process_loop().call_soon_threadsafe(call, context=contextvars.Context())
    return result.result()


class _Exit:
    """SystemExit or KeyboardInterrupt, carried back from the process scope's loop as a value."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _guarded(work: Callable[[], Coroutine[Any, Any, T]]) -> T | _Exit:
    # Raised out of an asyncio task, these two escape run_forever() and end the process scope's
    # thread, leaving every caller waiting for ever: the caller raises them instead. ``work`` is
    # called here, so that a task cancelled before it starts leaves no coroutine un-awaited.
    try:
        return await work()
    except (SystemExit, KeyboardInterrupt) as exc:
        return _Exit(exc)


def _unwrap(result: T | _Exit) -> T:
    if isinstance(result, _Exit):
        raise result.exc
    return result


def _submit(work: Callable[[], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T | _Exit]:
    # In a context of its own: the caller's (its async library) would otherwise follow the work
    # into the process scope's loop. Only the attempt the caller works for goes along, so that
    # the wait is an edge of the wait-for graph: a def fn that asks get_sync() for a value that
    # waits on fn itself raises OnceCycleError instead of blocking its thread for ever. So does
    # the caller's span, which links to the attempt it waits for.
    context = contextvars.Context()
    context.run(working.set, working.get())
    carry(context)
    return context.run(asyncio.run_coroutine_threadsafe, _guarded(work), process_loop())


@atexit.register
def _stop_process_loop() -> None:
    """At interpreter exit: close the process scope (cleanups run), then stop its loop.

    The loop stays the process scope's meanwhile: a call that daemon threads make during the
    exit's cleanup is refused there (OnceClosedError), instead of starting a second loop whose
    values nothing would clean up.
    """
    global _process_loop, _exited
    with _process_lock:
        loop, _exited = _process_loop, _process_loop is None
    if loop is None:
        return
    closing = _submit(lambda: close(PROCESS_EXIT_TIMEOUT))  # a cleanup's exit comes back here
    try:
        _unwrap(closing.result())
    except BaseException as exc:
        # The type only, as everywhere: the message and traceback are at DEBUG.
        kind = error_type(exc)
        logger.error(
            "cleaning up the process-scope onces at exit failed with %s",
            kind,
            extra=fields(None, "cleanup_failed", error_type=kind),
        )
        logger.debug(
            "cleaning up the process-scope onces at exit failed",
            exc_info=exc,
            extra=fields(None, "failure_detail", error_type=kind),
        )
    with _process_lock:  # later calls (exit handlers that run after this one) are refused
        _process_loop, _exited = None, True
    loop.call_soon_threadsafe(loop.stop)


def _forget_in_child() -> None:
    # A child process starts with its parent's loops gone, the process scope's too. Its locks
    # are new: a thread of the parent that held one at the fork does not exist here to release it.
    global _process_loop, _process_thread, _process_state, _lock, _process_lock, _exited
    _lock, _process_lock = threading.RLock(), threading.Lock()
    _states.clear()
    _process_loop = _process_thread = _process_state = None
    _exited = False


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_in_child)
