"""scope="process": one value per process, shared by every event loop and thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import trio
import uvloop
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_once import (
    Once,
    OnceClosedError,
    OnceCycleError,
    _loops,
    once,
    once_lifespan,
    readiness_router,
)
from fastapi_once._loops import forget_everything
from fastapi_once.testing import override

LOOPS = ["asyncio", "trio", "uvloop"]


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in a thread of its own; return their results (or raised exceptions)."""
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a caller hung"
    return results


def in_loop(loop: str, call: Callable[[], Any]) -> Callable[[], Any]:
    """A function that runs the coroutine function ``call`` in a new event loop of ``loop``."""
    if loop == "trio":
        return lambda: trio.run(call)
    if loop == "uvloop":
        return lambda: uvloop.run(call())
    return lambda: asyncio.run(call())


def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for ``condition``, which another thread makes true."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


class Gate:
    """A process-scope async def held until released, counting its runs."""

    def __init__(self, fail_first: bool = False) -> None:
        self.runs = 0
        self.fail_first = fail_first
        self.release = threading.Event()

        async def make() -> object:
            self.runs += 1
            await anyio.to_thread.run_sync(self.release.wait)
            if self.fail_first and self.runs == 1:
                raise ConnectionError("upstream down")
            return object()

        self.once: Once[[], object] = once(make, scope="process")


def callers(target: Once[[], object], per_loop: int = 3) -> list[Callable[[], Any]]:
    """Two loops each of asyncio, trio and uvloop, in threads, each awaiting ``target``."""

    async def many() -> list[object]:
        results: list[object] = []

        async def one() -> None:
            try:
                results.append(await target())
            except ConnectionError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(per_loop):
                tg.start_soon(one)
        return results

    return [in_loop(loop, many) for loop in LOOPS * 2]


def test_every_loop_and_thread_waits_for_one_run_and_gets_the_same_value() -> None:
    """Six loops (asyncio, trio, uvloop) in six threads, three callers each: fn runs once."""
    gate = Gate()
    done: list[Any] = []
    waiting = threading.Thread(target=lambda: done.extend(in_threads(*callers(gate.once))))
    waiting.start()
    until(lambda: gate.once.status().joins == 17)  # all eighteen callers are in, none served
    gate.release.set()
    waiting.join(30)
    values = [v for results in done for v in results]
    assert gate.runs == 1
    assert len(values) == 18
    assert len({id(v) for v in values}) == 1
    assert gate.once.get_sync() is values[0]


def test_a_failure_is_shared_by_every_loop_and_not_cached() -> None:
    """Callers in every loop get the one attempt's exception; the next call runs fn again."""
    gate = Gate(fail_first=True)
    done: list[Any] = []
    waiting = threading.Thread(target=lambda: done.extend(in_threads(*callers(gate.once, 1))))
    waiting.start()
    until(lambda: gate.once.status().joins == 5)
    gate.release.set()
    waiting.join(30)
    done = [e for results in done for e in results]
    errors = {id(e) for e in done}
    assert len(done) == 6
    assert all(isinstance(e, BaseException) for e in done)
    assert len(errors) == 1, "every loop got the same exception object"
    assert gate.once.get_sync() is not None
    assert gate.runs == 2


@pytest.mark.parametrize("loop", LOOPS)
def test_a_caller_that_leaves_does_not_cancel_the_run_for_callers_in_other_loops(
    loop: str,
) -> None:
    """A caller cancelled while waiting leaves alone; the run goes on and serves the others."""
    gate = Gate()

    async def leave() -> str:
        with anyio.move_on_after(0.05):
            await gate.once()
            return "served"
        return "left"

    assert in_threads(in_loop(loop, leave)) == ["left"]
    assert gate.once.status().state == "running"
    gate.release.set()
    assert gate.once.get_sync() is not None
    assert gate.runs == 1


def test_a_bare_testclient_loads_a_process_scope_value_once_for_all_its_requests() -> None:
    """TestClient(app) without `with` runs each request in a new loop; the value is made once."""
    runs: list[int] = []

    @once(scope="process")
    def load_model() -> dict[str, int]:
        runs.append(1)
        return {"weights": 42}

    app = FastAPI()

    @app.get("/")
    async def predict(model: dict[str, int] = Depends(load_model)) -> int:
        return id(model)

    client = TestClient(app)
    answers = {client.get("/").json() for _ in range(5)}
    assert runs == [1]
    assert len(answers) == 1


def test_sync_code_gets_the_value_with_get_sync_and_a_running_loop_is_refused() -> None:
    """get_sync() works in plain and worker threads; inside a loop it says to await instead."""

    @once(scope="process")
    def settings() -> dict[str, str]:
        return {"env": "prod"}

    async def from_worker_thread() -> object:
        return await anyio.to_thread.run_sync(settings.get_sync)

    async def inside_a_loop() -> object:
        return settings.get_sync()

    plain, worker = in_threads(settings.get_sync, in_loop("asyncio", from_worker_thread))
    assert plain is worker
    (refused,) = in_threads(in_loop("trio", inside_a_loop))
    assert isinstance(refused, RuntimeError)
    assert "await the once" in str(refused)


def test_get_sync_on_a_loop_scope_once_is_refused_with_the_fix() -> None:
    """A loop-scope once has no value outside a loop: the error names scope='process'."""

    async def client() -> object:
        return object()

    with pytest.raises(TypeError, match="scope='process'"):
        once(client).get_sync()


@pytest.mark.anyio
async def test_reset_from_any_loop_runs_the_cleanup_once_before_it_returns() -> None:
    """A def generator's cleanup runs, exactly once, before reset() returns; then fn runs anew."""
    events: list[str] = []

    @once(scope="process")
    def table() -> Iterator[dict[str, int]]:
        events.append("made")
        yield {"a": 1}
        events.append("cleaned")

    first = await table()
    await table.reset()
    assert events == ["made", "cleaned"]
    assert await table() is not first
    assert events == ["made", "cleaned", "made"]
    await table.reset()


@pytest.mark.anyio
async def test_a_keyed_process_scope_once_keeps_a_value_per_key_and_resets_one_key() -> None:
    """Keys are shared across loops; reset(key) cleans up only that key."""
    events: list[str] = []

    @once(key=lambda url: url, scope="process")
    def fetch(url: str) -> Iterator[str]:
        events.append(f"made {url}")
        yield url.upper()
        events.append(f"cleaned {url}")

    async def other_loop() -> list[str]:
        return [await fetch("a"), await fetch("b")]

    assert in_threads(in_loop("trio", other_loop)) == [["A", "B"]]
    in_worker = await anyio.to_thread.run_sync(fetch.get_sync, "a")
    assert [await fetch("a"), await fetch("b"), in_worker] == ["A", "B", "A"]
    await fetch.reset("a")
    assert events == ["made a", "made b", "cleaned a"]
    assert await fetch("b") == "B"
    assert events[-1] == "cleaned a"
    await fetch.reset()
    assert sorted(events) == sorted(["made a", "made b", "cleaned a", "cleaned b"])


def test_an_async_generator_is_refused_with_the_reason() -> None:
    """Its cleanup needs the loop that made it, which other loops cannot use."""

    async def client() -> Any:
        yield object()

    with pytest.raises(TypeError, match="event loop that made it"):
        once(client, scope="process")


def test_an_unknown_scope_is_refused_naming_the_choices() -> None:
    """scope= takes 'loop' or 'process'."""

    async def model() -> object:
        return object()

    with pytest.raises(ValueError, match=r"'loop'.*'process'"):
        once(model, scope="thread")  # type: ignore[typeddict-item]


@pytest.mark.anyio
async def test_a_process_scope_function_that_awaits_itself_raises_instead_of_hanging() -> None:
    """The wait-for graph sees the cycle inside the process scope's loop too."""

    @once(scope="process")
    async def me() -> object:
        return await me()

    with pytest.raises(OnceCycleError):
        await me()


def test_the_lifespan_warms_a_process_scope_value_and_keeps_it_unless_asked() -> None:
    """Shutdown leaves a process-scope value to the process; reset_process_scope=True cleans it."""
    events: list[str] = []

    def make(name: str) -> Once[[], str]:
        def model() -> Iterator[str]:
            events.append(f"made {name}")
            yield name
            events.append(f"cleaned {name}")

        model.__qualname__ = f"model_{name}"
        return once(model, scope="process")

    kept, reset = make("kept"), make("reset")
    for target, asked in ((kept, False), (reset, True)):
        with TestClient(FastAPI(lifespan=once_lifespan(target, reset_process_scope=asked))):
            assert events[-1] == f"made {target.get_sync()}"
    assert events == ["made kept", "made reset", "cleaned reset"]
    assert kept.status().state == "ready"
    assert reset.status().state == "idle"
    forget_everything()
    assert events[-1] == "cleaned kept"


def test_forget_everything_cleans_up_the_process_scope() -> None:
    """The once_reset fixture's teardown reaches the process scope's values too."""
    events: list[str] = []

    @once(scope="process")
    def table() -> Iterator[int]:
        yield 1
        events.append("cleaned")

    assert table.get_sync() == 1
    forget_everything()
    assert events == ["cleaned"]


def test_forget_everything_stops_waiting_for_a_hung_process_scope_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A function that never returns cannot hang the test teardown; what it makes is cleaned up."""
    monkeypatch.setattr(_loops, "PROCESS_EXIT_TIMEOUT", 0.05)
    gate, events = Gate(), list[str]()

    @once(scope="process")
    def table() -> Iterator[int]:
        gate.release.wait()
        yield 1
        events.append("cleaned")

    waiter: list[Any] = []
    started = threading.Thread(target=lambda: waiter.extend(in_threads(table.get_sync)))
    started.start()
    until(lambda: table.status().state == "running")
    forget_everything()
    assert events == []
    gate.release.set()
    started.join(10)
    until(lambda: events == ["cleaned"])
    assert isinstance(waiter[0], OnceClosedError), "made after the reset: given to nobody"


@pytest.mark.anyio
async def test_override_and_readiness_work_on_a_process_scope_once() -> None:
    """override() pins the value in the process scope; the probe warms and reports it."""

    @once(scope="process")
    async def model() -> str:
        return "real"

    async with override(model, "fake"):
        assert await model() == "fake"
    app = FastAPI()
    app.include_router(readiness_router(model, warm=True))
    transport = __import__("httpx").ASGITransport(app=app)
    async with __import__("httpx").AsyncClient(transport=transport, base_url="http://t") as c:
        first = await c.get("/ready")
        assert first.status_code in (200, 503)
        assert await model() == "real"
        assert (await c.get("/ready")).status_code == 200
    await model.reset()


def test_values_are_cleaned_up_at_interpreter_exit() -> None:
    """A process-scope value still in service when the interpreter exits is cleaned up once."""
    script = textwrap.dedent(
        """
        from fastapi_once import once

        @once(scope="process")
        def table():
            yield {"a": 1}
            print("cleaned", flush=True)

        print("value", table.get_sync()["a"], flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split("\n") == ["value 1", "cleaned", ""]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_value_in_a_fresh_process_scope() -> None:
    """The child has no process-scope thread: it starts one and runs fn itself, without hanging."""
    script = textwrap.dedent(
        """
        import os
        from fastapi_once import once

        runs = []

        @once(scope="process")
        def table():
            runs.append(os.getpid())
            return os.getpid()

        parent = table.get_sync()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if table.get_sync() == os.getpid() != parent else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), len(runs))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split() == ["0", "1"]
