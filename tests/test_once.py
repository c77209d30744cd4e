"""Exactly once, identity, and wake-all: the single-flight core."""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from crowd import crowd

from fastapi_once import Once, _attempts, _core, _records, once

pytestmark = pytest.mark.anyio


async def test_ten_thousand_cold_callers_run_fn_once_and_share_one_object() -> None:
    """10,000 concurrent callers at cold start: fn runs once; all get the identical object."""
    runs = 0

    @once
    async def load_model() -> object:
        nonlocal runs
        runs += 1
        await anyio.sleep(0.01)
        return object()

    results = await crowd(load_model, 10_000)
    assert runs == 1
    assert len(results) == 10_000
    assert all(r is results[0] for r in results)


async def test_later_calls_return_the_made_value_without_running_fn() -> None:
    """After the value exists, every call returns it and fn does not run again."""
    runs = 0

    @once
    async def load() -> list[int]:
        nonlocal runs
        runs += 1
        return [runs]

    first = await load()
    assert [await load() for _ in range(100)] == [first] * 100
    assert runs == 1


async def _ticks_until_all_resumed(get: object, callers: int) -> int:
    """Start ``callers`` waiters on ``get()``, open its gate, count loop ticks until all resumed."""
    resumed = 0

    async def caller() -> None:
        nonlocal resumed
        await get()  # type: ignore[operator]
        resumed += 1

    ticks = 0
    async with anyio.create_task_group() as group:
        for _ in range(callers):
            group.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        _gate.set()
        while resumed < callers:
            await anyio.lowlevel.checkpoint()
            ticks += 1
    return ticks


_gate: anyio.Event


async def test_waiters_are_released_together_not_one_per_loop_tick() -> None:
    """Wake-all: 1,000 waiters resume within a few loop ticks of the value being made."""
    global _gate
    _gate = anyio.Event()

    @once
    async def make() -> int:
        await _gate.wait()
        return 1

    assert await _ticks_until_all_resumed(make, 1000) <= 5

    # The lock hand-off recipe this replaces needs about one tick per waiter.
    _gate = anyio.Event()
    lock = anyio.Lock()
    value: list[int] = []

    async def lock_recipe() -> int:
        async with lock:
            if not value:
                await _gate.wait()
                value.append(1)
        return value[0]

    assert await _ticks_until_all_resumed(lock_recipe, 1000) > 500


async def test_a_made_value_is_returned_without_suspending_or_spawning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hot path: no lock, no task, no I/O — the call completes without ever suspending."""

    @once
    async def make() -> object:
        return object()

    value = await make()

    def no_spawn(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hot path spawned a task")

    monkeypatch.setattr(_records, "spawn", no_spawn)
    monkeypatch.setattr(_attempts.anyio, "Event", no_spawn)
    for _ in range(3):
        call = make()
        with pytest.raises(StopIteration) as done:
            call.send(None)
        assert done.value.value is value


async def test_the_work_runs_in_a_task_the_library_owns() -> None:
    """The work does not run in the caller's task (so the caller can leave without harm)."""
    callers: list[object] = []

    @once
    async def make() -> object:
        if anyio.get_current_task().name.startswith("fastapi_once"):
            return "library task"
        return "caller task"

    callers.append(await make())
    assert callers == ["library task"]


def test_once_of_a_function_is_one_object_and_once_of_a_once_is_itself() -> None:
    """once(fn) is once(fn); once(a_once) is a_once; @once and @once() give a Once."""

    async def fn() -> int:
        return 1

    first = once(fn)
    assert isinstance(first, Once)
    assert once(fn) is first
    assert once(first) is first

    @once()
    async def other() -> int:
        return 2

    assert isinstance(other, Once)
    assert once(other) is other


def test_asking_again_with_the_same_options_returns_the_existing_once() -> None:
    """Same explicit options, or none, give back the existing once."""

    def key(url: str) -> str:
        return url

    async def get_stuff(url: str) -> str:
        return url

    made = once(get_stuff, key=key, maxsize=5)
    assert once(get_stuff, key=key, maxsize=5) is made
    assert once(get_stuff) is made


def test_a_once_looks_like_its_function() -> None:
    """Name, qualname, module and docstring come from fn; repr names the once."""

    async def load_model() -> int:
        """Load the model."""
        return 1

    made = once(load_model)
    assert made.__name__ == "load_model"
    assert made.__doc__ == "Load the model."
    assert made.__module__ == __name__
    assert repr(made) == f"<Once {__name__}.{load_model.__qualname__}>"
    assert made.name.endswith("load_model")


def test_calling_a_once_outside_an_event_loop_says_so() -> None:
    """A once awaited with no running loop raises a clear RuntimeError."""

    @once
    async def make() -> int:
        return 1

    call = make()
    with pytest.raises(RuntimeError, match="running event loop"):
        call.send(None)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_unkeyed_once_rejects_arguments() -> None:
    """Passing arguments to an unkeyed once is a TypeError that points to key=."""

    @once
    async def make() -> int:
        return 1

    call: object = make
    with pytest.raises(TypeError, match=r"takes no arguments.*key="):
        await call(1)  # type: ignore[operator]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_library_tasks_are_kept_alive_by_strong_references() -> None:
    """asyncio keeps weak task references only: the library keeps its own until done."""
    assert isinstance(_core.current_loop(), asyncio.AbstractEventLoop)
    gate = anyio.Event()

    @once
    async def make() -> int:
        await gate.wait()
        return 1

    with anyio.move_on_after(0):
        await make()
    gc.collect()  # no caller is left: only the library's references keep the attempt's task
    assert any(t.get_name().startswith("fastapi_once") for t in asyncio.all_tasks())
    gate.set()
    assert await make() == 1


async def test_an_unkeyed_once_refuses_arguments_cold_and_warm() -> None:
    """Arguments to an unkeyed once are a TypeError on every call, not silently ignored."""

    @once
    async def settings() -> str:
        return "settings"

    call: Any = settings
    with pytest.raises(TypeError, match="takes no arguments"):
        await call("cold")
    assert await settings() == "settings"
    with pytest.raises(TypeError, match="takes no arguments"):
        await call("warm")
    with pytest.raises(TypeError, match="takes no arguments"):
        await call(x=1)


async def test_once_of_a_bound_method_does_not_keep_its_object_alive() -> None:
    """Interning holds a bound method's object weakly; once(obj.m) is once(obj.m) while it lives."""

    class Client:
        async def connect(self) -> str:
            return "connected"

    obj = Client()
    first = once(obj.connect)
    assert once(obj.connect) is first
    assert await first() == "connected"
    gone = weakref.ref(obj)
    del obj
    gc.collect()
    assert gone() is None


def test_a_once_is_a_coroutine_function_to_inspect_and_asyncio() -> None:
    """inspect and asyncio see a once as the async callable it is (Python 3.10+)."""

    @once
    async def load() -> int:
        return 1

    assert inspect.iscoroutinefunction(load)
    if sys.version_info < (3, 14):  # asyncio.iscoroutinefunction is deprecated from 3.14
        assert asyncio.iscoroutinefunction(load)
    assert inspect.signature(load).parameters == {}
