"""State belongs to the running event loop: a new loop starts fresh and never touches the old."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest
import trio
from crowd import crowd
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_once import OnceLoopWarning, once


def test_a_second_asyncio_run_starts_fresh() -> None:
    """Two asyncio.run calls: fn runs once in each, and each loop has its own value."""
    runs = 0

    @once
    async def make() -> object:
        nonlocal runs
        runs += 1
        return object()

    async def twice() -> tuple[object, object]:
        return await make(), await make()

    a1, a2 = asyncio.run(twice())
    b1, b2 = asyncio.run(twice())
    assert a1 is a2
    assert b1 is b2
    assert a1 is not b1
    assert runs == 2


def test_a_second_testclient_block_starts_fresh_without_loop_errors() -> None:
    """Loop-bound objects made in one TestClient block are never handed to the next."""
    runs = 0

    @once
    async def get_lock() -> asyncio.Lock:
        nonlocal runs
        runs += 1
        return asyncio.Lock()

    app = FastAPI()

    @app.get("/")
    async def root(lock: asyncio.Lock = Depends(get_lock)) -> str:
        async with lock:  # a lock from another loop would fail here
            return "ok"

    for _ in range(2):
        with TestClient(app) as http:
            assert http.get("/").json() == "ok"
            assert http.get("/").json() == "ok"
    assert runs == 2


def test_an_attempt_left_pending_when_its_loop_closed_does_not_block_a_new_loop() -> None:
    """A loop that closed mid-attempt leaves nothing the next loop waits for."""
    started = threading.Event()

    @once
    async def make() -> str:
        started.set()
        await asyncio.Event().wait()  # never finishes in the first loop
        return "made"  # pragma: no cover

    async def leave_it_pending() -> None:
        with anyio.move_on_after(0.05):
            await make()

    asyncio.run(leave_it_pending())
    assert started.is_set()

    @once
    async def fresh() -> str:
        return "fresh"

    async def second_loop() -> str:
        with anyio.fail_after(5):
            return await fresh()

    assert asyncio.run(second_loop()) == "fresh"


def test_the_cancelled_attempt_of_a_closing_loop_is_retried_in_the_next_loop() -> None:
    """The same once, interrupted by its loop closing, runs again in the next loop."""
    runs = 0

    @once
    async def make() -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            await asyncio.Event().wait()
        return runs

    async def leave_it_pending() -> None:
        with anyio.move_on_after(0.05):
            await make()

    asyncio.run(leave_it_pending())

    async def call() -> int:
        with anyio.fail_after(5):
            return await make()

    assert asyncio.run(call()) == 2


def test_loops_running_at_once_in_two_threads_keep_separate_values() -> None:
    """Two loops in two threads at the same time: one value each, no interference."""
    runs = 0
    barrier = threading.Barrier(2)

    @once
    async def make() -> tuple[int, object]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return threading.get_ident(), object()

    results: dict[int, list[tuple[int, object]]] = {}

    def run_loop() -> None:
        async def main() -> list[tuple[int, object]]:
            barrier.wait()
            return list(await asyncio.gather(*[make() for _ in range(100)]))

        results[threading.get_ident()] = asyncio.run(main())

    threads = [threading.Thread(target=run_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert runs == 2
    for ident, values in results.items():
        assert {v[0] for v in values} == {ident}
        assert all(v[1] is values[0][1] for v in values)


def test_trio_and_asyncio_runs_keep_separate_values() -> None:
    """A trio run and an asyncio run each make their own value."""

    @once
    async def make() -> object:
        await anyio.lowlevel.checkpoint()
        return object()

    from_trio = trio.run(make)
    from_asyncio = asyncio.run(make())
    again_trio = trio.run(make)
    assert from_trio is not from_asyncio
    assert again_trio is not from_trio


@pytest.mark.anyio
async def test_within_one_loop_the_value_is_shared_by_every_task() -> None:
    """Inside one loop, tasks share the value (the per-loop state is not per task)."""

    @once
    async def make() -> object:
        return object()

    values = await crowd(make, 10)
    assert all(v is values[0] for v in values)


def test_closed_loops_and_what_was_kept_for_them_are_collected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five asyncio.run loops use a keyed, an unkeyed and a generator once: once each loop has
    closed, no loop, store or value is left alive; the generator's cleanup ran in each loop (at
    its end, with the OnceLoopWarning that says so, as before)."""
    # Captured INFO records would hold their arguments (an attempt, and so its value).
    caplog.set_level(logging.WARNING, logger="fastapi_once")
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    values: list[weakref.ref[object]] = []
    cleaned: list[int] = []

    class Thing:
        pass

    @once
    async def unkeyed() -> Thing:
        return Thing()

    @once(key=lambda k: k)
    async def keyed(k: int) -> Thing:
        return Thing()

    @once
    async def pool() -> AsyncIterator[Thing]:
        yield Thing()
        cleaned.append(1)

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        for value in (await unkeyed(), await keyed(1), await keyed(2), await pool()):
            values.append(weakref.ref(value))

    for _ in range(5):
        with pytest.warns(OnceLoopWarning, match="still in service|made again in a new event"):
            asyncio.run(main())
    gc.collect()
    assert [ref() for ref in loops] == [None] * 5
    assert [ref() for ref in values] == [None] * 20
    assert cleaned == [1] * 5
