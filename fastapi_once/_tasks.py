"""The tasks the library owns: the work of an attempt, which then keeps the value it made.

A library task belongs to no request, so no caller's cancellation reaches it. What does reach it
is its event loop ending: ``asyncio.run`` and trio cancel every task left. A task that keeps a
value must then still run that value's cleanup to the end. trio's shielded scopes hold against
that; asyncio's native ``Task.cancel()`` goes through anyio's shields, so on asyncio a keeping
task turns the cancellation into a retirement of its value instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

# asyncio keeps only weak references to tasks: these strong ones keep the library's work alive
# after every caller has left.
_tasks: set[asyncio.Task[None]] = set()


class _LibraryTask(asyncio.Task):  # type: ignore[type-arg]
    """An asyncio task of the library's; while it keeps a value, cancelling it retires the value."""

    on_cancel: Callable[[], None] | None = None

    def cancel(self, msg: Any = None) -> bool:
        if self.on_cancel is not None:
            self.on_cancel()
            return False
        return super().cancel(msg)


def spawn(loop: object, work: Coroutine[Any, Any, None], name: str, track: bool = True) -> object:
    """Run ``work`` in a task owned by the library, not by the caller, in the caller's context.

    ``work`` must never raise: it delivers what happened to whoever waits for it. Returns the
    asyncio task (None on trio). With ``track=False`` the caller keeps the task referenced
    until it ends (an attempt that keeps no value holds its own), which spares a done callback.
    """
    if isinstance(loop, asyncio.AbstractEventLoop):
        if not track:  # it keeps no value, so it needs no retiring on cancel either
            return asyncio.Task(work, loop=loop, name=name)
        task = _LibraryTask(work, loop=loop, name=name)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return task
    else:
        import trio

        async def main() -> None:
            await work

        # A system task lives as long as the run and belongs to no request; trio turns an
        # exception escaping it into a crash of the whole run, hence work's promise not to raise.
        trio.lowlevel.spawn_system_task(main, name=name, context=contextvars.copy_context())
        return None


class Spawn(Protocol):
    """Starts a library task for ``work`` (see :func:`spawner`)."""

    def __call__(self, work: Coroutine[Any, Any, None], *, name: str) -> object:
        """Run ``work`` in a task of the library's named ``name``; return the task, if any."""


def spawner(loop: object, track: bool) -> Spawn:
    """What spawns ``loop``'s library tasks (see :func:`spawn`), called in that loop only.

    An asyncio loop's untracked work is an ``asyncio.Task`` of the running loop, made with no
    call in between; the spawner holds no reference to ``loop`` (a store keeps it).
    """
    if track or not isinstance(loop, asyncio.AbstractEventLoop):
        held = weakref.ref(loop)
        return lambda work, *, name: spawn(held(), work, name, track)
    return asyncio.Task  # type: ignore[return-value]


@contextlib.contextmanager
def cancelling_retires(retire: Callable[[], None]) -> Iterator[None]:
    """Inside the block, cancelling the current library task (on asyncio) calls ``retire``."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio: its cancellation is shielded where it matters
        task = None
    if not isinstance(task, _LibraryTask):
        yield
        return
    task.on_cancel = retire
    try:
        yield
    finally:
        task.on_cancel = None
