"""Where scope="process" meets the other features: cycles, lifespan, exit, fork, time, keys."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_once import OnceClosedError, OnceCycleError, once, once_lifespan
from fastapi_once.backends import Backend


def in_threads(*calls: Callable[[], Any], wait: float = 10) -> list[Any]:
    """Run each call in a daemon thread; return results or exceptions; fail on one that hangs."""
    results: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(wait)
        assert not thread.is_alive(), "a caller hung"
    return results


def run_script(script: str, timeout: float = 60) -> list[str]:
    """Run ``script`` in a fresh interpreter; return its stdout lines."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


# --- cycles through get_sync --------------------------------------------------------------------


def test_a_def_function_that_asks_get_sync_for_its_own_value_raises_instead_of_hanging() -> None:
    """fn -> its own get_sync() (from fn's worker thread) is a cycle: OnceCycleError, no hang."""

    @once(scope="process")
    def me() -> object:
        return me.get_sync()

    (got,) = in_threads(me.get_sync)
    assert isinstance(got, OnceCycleError)


def test_two_def_functions_asking_each_other_through_get_sync_raise_instead_of_hanging() -> None:
    """a -> b.get_sync() -> a.get_sync() closes a cycle across the worker threads: it raises."""

    @once(scope="process")
    def first() -> object:
        return second.get_sync()

    @once(scope="process")
    def second() -> object:
        return first.get_sync()

    (got,) = in_threads(first.get_sync)
    assert isinstance(got, OnceCycleError)
    assert "first" in str(got)
    assert "second" in str(got)


def test_get_sync_of_another_process_once_from_a_def_function_still_works() -> None:
    """No cycle, no error: a def fn builds on another process-scope value through get_sync."""

    @once(scope="process")
    def settings() -> dict[str, str]:
        return {"env": "prod"}

    @once(scope="process")
    def model() -> str:
        return f"model for {settings.get_sync()['env']}"

    assert in_threads(model.get_sync, settings.get_sync) == ["model for prod", {"env": "prod"}]


@pytest.mark.anyio
async def test_a_loop_scope_def_and_a_process_scope_once_waiting_on_each_other_raise() -> None:
    """loop fn -> process.get_sync() -> process fn awaits the loop once -> cycle: it raises."""

    @once
    def local() -> object:
        return shared.get_sync()

    @once(scope="process")
    async def shared() -> object:
        return await local()

    with pytest.raises(OnceCycleError):
        await local()


@pytest.mark.anyio
async def test_a_process_scope_once_and_a_loop_scope_once_awaiting_each_other_raise() -> None:
    """process fn awaits a loop-scope once (made in the library's loop) that awaits it back."""

    @once(scope="process")
    async def shared() -> object:
        return await local()

    @once
    async def local() -> object:
        return await shared()

    with pytest.raises(OnceCycleError):
        await local()
    with pytest.raises(OnceCycleError):
        await shared()


# --- once_lifespan(reset_process_scope=True) ----------------------------------------------------


def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for ``condition``, which another thread makes true."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def test_a_lifespan_resetting_the_process_scope_stops_waiting_at_shutdown_timeout() -> None:
    """A hung process-scope run cannot hold shutdown past shutdown_timeout; its value is cleaned."""
    release, events = threading.Event(), list[str]()
    runs = itertools.count(1)

    @once(scope="process")
    def model() -> Iterator[int]:
        run = next(runs)
        if run > 1:
            release.wait(30)
        yield run
        events.append(f"cleaned {run}")

    app = FastAPI(lifespan=once_lifespan(model, reset_process_scope=True, shutdown_timeout=0.1))
    client = TestClient(app)
    client.__enter__()
    assert model.get_sync() == 1
    in_threads(lambda: asyncio.run(model.reset()))
    waiter: list[Any] = []
    second = threading.Thread(target=lambda: waiter.extend(in_threads(model.get_sync, wait=30)))
    second.start()
    until(lambda: model.status().state == "running")
    closing = threading.Thread(target=client.__exit__, args=(None, None, None), daemon=True)
    closing.start()
    closing.join(10)
    hung = closing.is_alive()
    release.set()
    closing.join(10)
    second.join(10)
    assert not hung, "shutdown waited for the hung run past shutdown_timeout"
    until(lambda: events == ["cleaned 1", "cleaned 2"])
    assert isinstance(waiter[0], OnceClosedError), "made after shutdown: given to nobody"


class MemoryBackend(Backend):
    """Records results in a dict, as a cross-process backend would."""

    def __init__(self) -> None:
        self.results: dict[str, str] = {}

    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        if name not in self.results:
            self.results[name] = json.dumps(await work())
        return json.loads(self.results[name])

    async def reset(self, name: str) -> None:
        self.results.pop(name, None)

    def describe(self) -> str:
        return "memory"


def test_a_lifespan_resetting_the_process_scope_leaves_the_backends_record() -> None:
    """Shutdown forgets values in this process only: other processes must not run fn again."""
    backend = MemoryBackend()

    @once(scope="process", across=backend, name="meetings.migrate")
    def migrate() -> str:
        return "migrated"

    with TestClient(FastAPI(lifespan=once_lifespan(migrate, reset_process_scope=True))):
        assert migrate.get_sync() == "migrated"
    assert migrate.status().state == "idle"
    assert backend.results == {"meetings.migrate": '"migrated"'}


# --- interpreter exit and fork ------------------------------------------------------------------


def test_a_call_while_the_interpreter_exits_is_refused_rather_than_starting_a_second_loop() -> None:
    """A daemon thread's call during the exit's cleanup gets OnceClosedError; nothing leaks."""
    lines = run_script(
        """
        import threading
        from fastapi_once import OnceClosedError, once, _loops

        answered = threading.Event()

        @once(scope="process")
        def slow():
            answered.wait(20)  # in flight when the interpreter exits, until the late call is done
            yield "slow"
            print("cleaned-slow", flush=True)

        @once(scope="process")
        def other():
            print("made-other", flush=True)
            yield "other"
            print("cleaned-other", flush=True)

        def late():
            while not (_loops._process_state and _loops._process_state.closed):
                threading.Event().wait(0.005)
            try:
                other.get_sync()
            except OnceClosedError:
                print("late-refused", flush=True)
            finally:
                answered.set()

        threading.Thread(target=slow.get_sync, daemon=True).start()
        threading.Thread(target=late, daemon=True).start()
        while slow.status().state != "running":
            threading.Event().wait(0.005)
        """
    )
    assert lines == ["late-refused", "cleaned-slow"]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("lock", ["_lock", "_process_lock"])
def test_a_child_forked_while_another_thread_holds_a_loops_lock_does_not_hang(lock: str) -> None:
    """A fork in the middle of another thread's state_of() (or loop start) leaves no lock held."""
    lines = run_script(
        f"""
        import os, threading
        from fastapi_once import once, _loops

        @once(scope="process")
        def table():
            return os.getpid()

        parent = table.get_sync()
        held, go = threading.Event(), threading.Event()

        def hold():
            with _loops.{lock}:  # as a thread would, meeting a new loop at the moment of fork
                held.set()
                go.wait()

        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            got = []
            t = threading.Thread(target=lambda: got.append(table.get_sync()), daemon=True)
            t.start()
            t.join(10)
            os._exit(0 if got == [os.getpid()] else 4)
        go.set()
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), parent == os.getpid())
        """
    )
    assert lines == ["0", "True"]
