"""Which event loop is running, and the tasks the library owns in it (asyncio or trio)."""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Awaitable, Callable


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


# asyncio keeps only weak references to tasks: these strong ones keep the library's work alive
# after every caller has left.
_tasks: set[asyncio.Task[None]] = set()


def spawn(loop: object, fn: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``fn()`` in a task owned by the library, not by the caller, in the caller's context.

    ``fn`` must never raise: it delivers what happened to whoever waits for it.
    """
    if isinstance(loop, asyncio.AbstractEventLoop):

        async def main() -> None:
            await fn()

        task = loop.create_task(main(), name=name)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    else:
        import trio

        # A system task lives as long as the run and belongs to no request; trio turns an
        # exception escaping it into a crash of the whole run, hence fn's promise not to raise.
        trio.lowlevel.spawn_system_task(fn, name=name, context=contextvars.copy_context())
