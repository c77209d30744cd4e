"""Where scope="process" meets the other features: cycles, lifespan, exit, fork, time, keys."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import uvloop
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from timekeeping import FakeClock

from fastapi_once import (
    OnceClosedError,
    OnceCycleError,
    OnceTimeoutError,
    once,
    once_lifespan,
    readiness_router,
)
from fastapi_once._loops import forget_everything
from fastapi_once.backends import Backend, FileLockBackend
from fastapi_once.testing import override


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
            except OnceClosedError as exc:
                print("late-refused", "interpreter is exiting" in str(exc), flush=True)
            finally:
                answered.set()

        threading.Thread(target=slow.get_sync, daemon=True).start()
        threading.Thread(target=late, daemon=True).start()
        while slow.status().state != "running":
            threading.Event().wait(0.005)
        """
    )
    assert lines == ["late-refused", "True", "cleaned-slow"]


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


# --- time: ttl, refresh, timeout, cooldown ------------------------------------------------------


def in_loop(loop: str, call: Callable[[], Awaitable[Any]]) -> Callable[[], Any]:
    """A function that runs the coroutine function ``call`` in a new event loop of ``loop``."""
    if loop == "trio":
        return lambda: trio.run(call)
    if loop == "uvloop":
        return lambda: uvloop.run(call())
    return lambda: asyncio.run(call())


LOOPS = ["asyncio", "trio", "uvloop"]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_due_refresh_asked_from_another_loop_serves_the_old_value_and_refreshes_once(
    loop: str, clock: FakeClock
) -> None:
    """The foreign caller is not kept waiting; the refresh runs once; then the new value serves."""
    release, runs = threading.Event(), itertools.count(1)

    @once(scope="process", refresh=10, ttl=100)
    def rates() -> int:
        run = next(runs)
        if run > 1:
            release.wait(10)
        return run

    assert rates.get_sync() == 1
    clock.advance(11)

    async def twice() -> list[int]:
        return [await rates(), await rates()]

    assert in_threads(in_loop(loop, twice)) == [[1, 1]]
    assert rates.status().state == "refreshing"
    assert rates.get_sync() == 1, "served without a hop while the refresh runs"
    release.set()
    until(lambda: rates.status().state == "ready" and rates.get_sync() == 2)
    assert rates.status().attempts == 2


def test_an_expired_value_is_not_served_by_a_read_from_another_thread(clock: FakeClock) -> None:
    """get_sync() past ttl makes a new value instead of reading the expired one."""
    runs = itertools.count(1)

    @once(scope="process", ttl=10)
    def token() -> int:
        return next(runs)

    assert in_threads(token.get_sync) == [1]
    clock.advance(10)
    assert in_threads(token.get_sync, token.get_sync) == [2, 2]
    assert token.status().attempts == 2


def test_a_timed_out_blocking_def_fails_every_loop_fast_and_runs_once_until_it_ends() -> None:
    """timeout= releases callers in every thread with one error; the thread's run is not doubled."""
    release, runs = threading.Event(), itertools.count(1)

    @once(scope="process", timeout=0.05)
    def slow() -> int:
        run = next(runs)
        if run == 1:
            release.wait(10)
        return run

    async def call() -> object:
        try:
            return await slow()
        except OnceTimeoutError as exc:
            return exc

    first = in_threads(slow.get_sync, in_loop("trio", call), in_loop("asyncio", call))
    assert all(isinstance(e, OnceTimeoutError) for e in first)
    assert len({id(e) for e in first}) == 1
    (again,) = in_threads(slow.get_sync)
    assert again is first[0], "the run still goes on: later calls get its error at once"
    release.set()
    until(lambda: slow.status().state != "running")
    assert slow.get_sync() == 2


def test_within_cooldown_every_loop_fails_fast_with_the_one_error(clock: FakeClock) -> None:
    """A failure with cooldown= is raised at once in every loop and thread; fn ran once."""
    runs = itertools.count(1)

    @once(scope="process", cooldown=30)
    def db() -> str:
        next(runs)
        raise ConnectionError("down")

    async def call() -> object:
        try:
            return await db()
        except ConnectionError as exc:
            return exc

    errors = in_threads(db.get_sync, *(in_loop(loop, call) for loop in LOOPS))
    assert all(isinstance(e, ConnectionError) for e in errors)
    assert len({id(e) for e in errors}) == 1
    assert next(runs) == 2, "fn ran once"
    clock.advance(30)
    (after,) = in_threads(db.get_sync)
    assert isinstance(after, ConnectionError)
    assert after is not errors[0]


# --- reset meeting work in flight -----------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reset_from_another_loop_during_a_run_waits_for_it_and_cleans_up_its_value(
    loop: str,
) -> None:
    """The run's waiter gets the value; reset() returns after that value's cleanup."""
    release, events = threading.Event(), list[str]()

    @once(scope="process")
    def table() -> Iterator[str]:
        release.wait(10)
        events.append("made")
        yield "table"
        events.append("cleaned")

    async def reset() -> list[str]:
        await table.reset()
        return list(events)

    got: list[Any] = []
    waiting = threading.Thread(target=lambda: got.extend(in_threads(table.get_sync)))
    waiting.start()
    until(lambda: table.status().state == "running")
    resetting: list[Any] = []
    resetter = threading.Thread(target=lambda: resetting.extend(in_threads(in_loop(loop, reset))))
    resetter.start()
    release.set()
    waiting.join(10)
    resetter.join(10)
    assert got == ["table"]
    assert resetting == [["made", "cleaned"]]
    assert table.status().state == "idle"


@pytest.mark.anyio
async def test_a_reset_during_a_refresh_cleans_up_the_old_and_the_new_value(
    clock: FakeClock,
) -> None:
    """reset() from this loop waits for the refresh in the library's loop, then cleans up both."""
    release, events, runs = threading.Event(), list[str](), itertools.count(1)

    @once(scope="process", refresh=10)
    def table() -> Iterator[int]:
        run = next(runs)
        if run > 1:
            release.wait(10)
        yield run
        events.append(f"cleaned {run}")

    assert await table() == 1
    clock.advance(11)
    assert await table() == 1
    assert table.status().state == "refreshing"
    async with anyio.create_task_group() as group:
        group.start_soon(table.reset)
        await anyio.to_thread.run_sync(release.set)
    assert sorted(events) == ["cleaned 1", "cleaned 2"]
    assert table.status().state == "idle"


@pytest.mark.anyio
async def test_a_process_scope_function_that_resets_itself_raises_instead_of_hanging() -> None:
    """reset() from inside fn would wait for fn: OnceCycleError, in the library's loop too."""

    @once(scope="process")
    async def me() -> object:
        await me.reset()
        return object()  # pragma: no cover - never reached

    with pytest.raises(OnceCycleError):
        await me()


# --- keys -----------------------------------------------------------------------------------------


def test_a_key_of_none_is_kept_evicted_and_remade_like_any_key_across_threads() -> None:
    """maxsize=1: keys None and "a" evict each other (with cleanup); None is an ordinary key."""
    events: list[str] = []

    @once(key=lambda name: name, maxsize=1, scope="process")
    def fetch(name: str | None) -> Iterator[str]:
        events.append(f"made {name}")
        yield f"value {name}"
        events.append(f"cleaned {name}")

    async def both() -> list[str]:
        return [await fetch(None), await fetch("a")]

    assert in_threads(lambda: fetch.get_sync(None)) == ["value None"]
    assert in_threads(in_loop("trio", both)) == [["value None", "value a"]]
    until(lambda: "cleaned None" in events)
    assert in_threads(lambda: fetch.get_sync(None)) == ["value None"]
    until(lambda: "cleaned a" in events)
    assert events[:3] == ["made None", "made a", "cleaned None"]
    assert events.count("made None") == 2
    forget_everything()


# --- FastAPI: sub-dependencies, readiness, override -----------------------------------------------


@pytest.mark.parametrize("with_block", [False, True])
def test_sub_dependencies_are_resolved_once_for_the_process_with_the_apps_overrides(
    with_block: bool,
) -> None:
    """Depends(get_settings) in fn: resolved once, honouring overrides; its cleanup on reset."""
    events: list[str] = []

    def get_settings() -> Iterator[dict[str, str]]:
        events.append("settings")
        yield {"env": "real"}
        events.append("settings closed")

    @once(scope="process")
    def load_model(settings: dict[str, str] = Depends(get_settings)) -> str:
        events.append("model")
        return f"model for {settings['env']}"

    app = FastAPI()

    @app.get("/")
    def predict(model: str = Depends(load_model)) -> str:
        return model

    app.dependency_overrides[get_settings] = lambda: {"env": "test"}
    client = TestClient(app)
    if with_block:
        with client:
            answers = [client.get("/").json() for _ in range(3)]
    else:
        answers = [client.get("/").json() for _ in range(3)]
    assert answers == ["model for test"] * 3
    assert events == ["model"]
    assert load_model.get_sync() == "model for test"
    in_threads(lambda: asyncio.run(load_model.reset()))
    del app.dependency_overrides[get_settings]
    assert client.get("/").json() == "model for real"
    in_threads(lambda: trio.run(load_model.reset))
    assert events == ["model", "settings", "model", "settings closed"]


def test_a_readiness_probe_in_a_bare_testclient_warms_and_pings_the_process_value() -> None:
    """Each probe runs in a new loop: the warm kick starts one run; the ping sees its value."""
    release, pinged = threading.Event(), list[object]()

    @once(scope="process", ping=pinged.append)
    def model() -> str:
        release.wait(10)
        return "model"

    app = FastAPI()
    app.include_router(readiness_router(model))
    client = TestClient(app)
    assert client.get("/ready").status_code == 503
    assert client.get("/ready").status_code == 503
    assert model.status().attempts == 1
    release.set()
    until(lambda: model.status().state == "ready")
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["onces"][model.name]["ping"] == "ok"
    assert pinged == ["model"]


def test_override_pins_the_value_for_every_loop_and_thread_and_then_lets_go() -> None:
    """override() of a process-scope once is seen by get_sync() and other loops until it exits."""

    @once(scope="process")
    def model() -> str:
        return "real"

    async def other_loop() -> str:
        return await model()

    async def overridden() -> list[Any]:
        async with override(model, "fake"):
            seen = await anyio.to_thread.run_sync(
                lambda: in_threads(model.get_sync, in_loop("uvloop", other_loop))
            )
            return [await model(), *seen]

    assert in_threads(in_loop("trio", overridden)) == [["fake", "fake", "fake"]]
    assert in_threads(model.get_sync, in_loop("asyncio", other_loop)) == ["real", "real"]


# --- cancellation, loops that end, threads ------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "waiting", "arriving"])
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_caller_cancelled_at_any_point_leaves_the_run_and_its_cleanup_intact(
    loop: str, where: str
) -> None:
    """Cancelled before the hop, while waiting, or as the value arrives: only the wait ends."""
    release, events = threading.Event(), list[str]()
    cancel: list[Callable[[], object]] = []

    @once(scope="process")
    def table() -> Iterator[str]:
        release.wait(10)
        if where == "arriving":
            cancel[0]()
        events.append("made")
        yield "table"
        events.append("cleaned")

    async def on_trio() -> str:
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            cancel.append(lambda: token.run_sync_soon(scope.cancel))
            if where == "before":
                scope.cancel()
            return await table()
        return "cancelled"

    async def on_asyncio() -> str:
        task, running = asyncio.current_task(), asyncio.get_running_loop()
        assert task is not None
        cancel.append(lambda: running.call_soon_threadsafe(task.cancel))
        if where == "before":
            task.cancel()
        try:
            return await table()
        except asyncio.CancelledError:
            return "cancelled"

    got: list[Any] = []
    caller = in_loop(loop, on_trio if loop == "trio" else on_asyncio)
    waiting = threading.Thread(target=lambda: got.extend(in_threads(caller)))
    waiting.start()
    if where == "waiting":
        until(lambda: table.status().state == "running" and bool(cancel))
        cancel[0]()
    release.set()
    waiting.join(10)
    assert got == ["cancelled"] if where != "arriving" else got[0] in ("table", "cancelled")
    assert table.get_sync() == "table"
    in_threads(lambda: asyncio.run(table.reset()))
    assert events == ["made", "cleaned"]


def test_a_caller_whose_loop_ends_while_it_waits_leaves_the_run_to_the_others() -> None:
    """asyncio.run() cancels a task left waiting as its loop ends; the run goes on for others."""
    release = threading.Event()

    @once(scope="process")
    def model() -> str:
        release.wait(10)
        return "model"

    async def leave_a_waiter_behind() -> None:
        left = asyncio.get_running_loop().create_task(model())  # left to the loop's end
        await asyncio.sleep(0)
        await anyio.to_thread.run_sync(until, lambda: model.status().state == "running")
        assert not left.done()

    in_threads(lambda: asyncio.run(leave_a_waiter_behind()))
    release.set()
    assert in_threads(model.get_sync) == ["model"]
    assert model.status().attempts == 1


def test_many_threads_calling_get_sync_on_a_cold_value_share_one_run() -> None:
    """Sixteen threads at once, the value not made yet: fn runs once, all get the same object."""
    runs, barrier = itertools.count(1), threading.Barrier(16)

    @once(scope="process")
    def model() -> object:
        next(runs)
        return object()

    def call() -> object:
        barrier.wait(10)
        return model.get_sync()

    values = in_threads(*[call] * 16)
    assert len({id(v) for v in values}) == 1
    assert next(runs) == 2


def test_status_read_from_other_threads_follows_a_run_in_the_librarys_loop() -> None:
    """status() from any thread sees running while the run goes on, then ready with its counts."""
    release = threading.Event()

    @once(scope="process")
    def model() -> str:
        release.wait(10)
        return "model"

    assert model.status().state == "idle"
    waiting = threading.Thread(target=lambda: in_threads(model.get_sync, model.get_sync))
    waiting.start()
    until(lambda: model.status().joins == 1)
    assert in_threads(lambda: model.status().state) == ["running"]
    release.set()
    waiting.join(10)
    (status,) = in_threads(model.status)
    assert (status.state, status.attempts, status.joins) == ("ready", 1, 1)


# --- logs, across= ------------------------------------------------------------------------------


def test_logs_from_the_librarys_loop_carry_the_fields_and_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records made in the library's thread have the usual fields; no key nor message verbatim."""

    @once(key=lambda token: token, scope="process", name="meetings.user")
    def user(token: str) -> str:
        raise PermissionError(f"bad {token}")

    async def call() -> object:
        try:
            return await user("token-abc")
        except PermissionError as exc:
            return exc

    with caplog.at_level(logging.DEBUG, logger="fastapi_once"):
        (error,) = in_threads(in_loop("trio", call))
    assert isinstance(error, PermissionError)
    records = [r for r in caplog.records if getattr(r, "once", None) == "meetings.user"]
    assert {r.event for r in records} >= {"start", "failed"}  # type: ignore[attr-defined]
    assert {r.threadName for r in records} == {"fastapi_once process scope"}
    failed = next(r for r in records if r.event == "failed")  # type: ignore[attr-defined]
    assert failed.error_type == "PermissionError"  # type: ignore[attr-defined]
    shown = [r.getMessage() for r in records if r.levelno > logging.DEBUG]
    assert not any("token-abc" in line for line in shown)


def test_across_a_file_backend_runs_once_for_every_thread_and_reset_clears_the_record(
    tmp_path: Path,
) -> None:
    """get_sync() and other loops share one backend lead; reset() from any loop clears it."""
    runs = itertools.count(1)

    @once(scope="process", across=FileLockBackend(tmp_path), name="meetings.seed")
    def seed() -> int:
        return next(runs)

    async def call() -> int:
        return await seed()

    assert in_threads(seed.get_sync, in_loop("trio", call), in_loop("uvloop", call)) == [1, 1, 1]
    in_threads(lambda: trio.run(seed.reset))
    assert in_threads(seed.get_sync) == [2]
    in_threads(lambda: asyncio.run(seed.reset()))


# --- exits raised by fn ---------------------------------------------------------------------------


@pytest.mark.parametrize("exit_type", [SystemExit, KeyboardInterrupt])
def test_an_exit_raised_by_fn_reaches_the_callers_and_the_librarys_loop_survives(
    exit_type: type[BaseException],
) -> None:
    """SystemExit/KeyboardInterrupt in fn reach every waiter; the process scope goes on serving."""
    runs = itertools.count(1)

    @once(scope="process")
    async def bye() -> int:
        if next(runs) == 1:
            raise exit_type(3)
        return 2

    async def call() -> object:
        try:
            return await bye()
        except exit_type as exc:
            return exc

    (first,) = in_threads(bye.get_sync)
    assert isinstance(first, exit_type)
    assert in_threads(in_loop("trio", call), in_loop("asyncio", call)) == [2, 2]


def test_a_cleanup_that_raises_systemexit_at_interpreter_exit_does_not_hang_the_exit() -> None:
    """The exit's cleanup gets the error back (logged) and stops the loop; the process ends."""
    lines = run_script(
        """
        import sys
        from fastapi_once import once

        @once(scope="process")
        def table():
            yield "table"
            print("cleaning", flush=True)
            sys.exit(5)

        print(table.get_sync(), flush=True)
        """,
        timeout=30,
    )
    assert lines == ["table", "cleaning"]


@pytest.mark.anyio
async def test_reset_all_and_a_loops_lifespan_shutdown_leave_the_process_value_alone() -> None:
    """Neither belongs to the running loop: the value stays in service for the other loops."""
    from fastapi_once import reset_all

    events: list[str] = []

    @once(scope="process")
    def table() -> Iterator[str]:
        yield "table"
        events.append("cleaned")

    first = await table()
    await reset_all()
    async with once_lifespan(table)(FastAPI()):
        assert await table() is first
    assert events == []
    assert in_threads(table.get_sync) == [first]
    await table.reset()
    assert events == ["cleaned"]


def test_a_call_from_an_exit_handler_that_runs_after_the_process_scope_closed_is_refused() -> None:
    """An atexit handler running after the library's (registered before it) gets an error."""
    lines = run_script(
        """
        import atexit

        def late():
            try:
                table.get_sync()
            except RuntimeError as exc:
                print("refused:", "interpreter is exiting" in str(exc), flush=True)

        atexit.register(late)  # before the import: runs after the library's own exit handler

        from fastapi_once import once

        @once(scope="process")
        def table():
            yield "table"
            print("cleaned", flush=True)

        print(table.get_sync(), flush=True)
        """,
        timeout=30,
    )
    assert lines == ["table", "cleaned", "refused:", "True"]


def test_callers_in_every_loop_wait_through_the_retries_of_one_run() -> None:
    """retries= happen in the library's loop; callers elsewhere get the final value, fn ran 3x."""
    runs, release = itertools.count(1), threading.Event()

    @once(scope="process", retries=2, backoff=0.001)
    def flaky() -> int:
        run = next(runs)
        release.wait(10)
        if run < 3:
            raise ConnectionError("not yet")
        return run

    async def call() -> int:
        return await flaky()

    done: list[Any] = []
    waiting = threading.Thread(
        target=lambda: done.extend(in_threads(*(in_loop(loop, call) for loop in LOOPS)))
    )
    waiting.start()
    until(lambda: flaky.status().joins == 2)
    release.set()
    waiting.join(10)
    assert done == [3, 3, 3]
    assert next(runs) == 4


def test_an_unhashable_key_from_another_loop_gets_the_named_type_error() -> None:
    """The read without a hop gives up on it; the library's loop raises the usual TypeError."""

    @once(key=lambda tags: tags, scope="process")
    def fetch(tags: list[str]) -> str:
        return ",".join(tags)  # pragma: no cover - never made

    async def call() -> object:
        try:
            return await fetch(["a"])
        except TypeError as exc:
            return exc

    (error,) = in_threads(in_loop("trio", call))
    assert isinstance(error, TypeError)
    assert "fetch" in str(error)


def test_a_burst_of_def_functions_calling_get_sync_does_not_exhaust_the_worker_threads() -> None:
    """Forty def fns (anyio's thread limit) blocked in get_sync() of a cold once still finish."""
    lines = run_script(
        """
        import os, threading, time
        from fastapi_once import once

        @once(scope="process")
        def settings():
            return "prod"

        together = threading.Barrier(40)

        @once(key=lambda i: i, scope="process")
        def fetch(i):
            together.wait(10)  # all forty hold a worker thread before any asks for settings
            return settings.get_sync()

        got = []
        threads = [
            threading.Thread(target=lambda i=i: got.append(fetch.get_sync(i)), daemon=True)
            for i in range(40)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        print(len(got), set(got), flush=True)
        os._exit(0)
        """,
        timeout=40,
    )
    assert lines == ["40", "{'prod'}"]


def test_work_in_flight_when_the_interpreter_exits_is_awaited_and_its_value_cleaned_up() -> None:
    """The main thread ends while a trio caller waits for a run: the run ends, then its cleanup."""
    lines = run_script(
        """
        import os, threading, trio
        from fastapi_once import once

        started = threading.Event()

        # One write per line: the two threads' lines must not interleave.
        @once(scope="process")
        def table():
            started.set()
            threading.Event().wait(0.2)  # still running when the main thread ends
            yield "table"
            os.write(1, b"cleaned\\n")

        async def wait_for_it():
            os.write(1, f"got {await table()}\\n".encode())

        threading.Thread(target=trio.run, args=(wait_for_it,), daemon=True).start()
        started.wait(10)
        """
    )
    # The daemon caller may print before or after the exit's cleanup, or not at all.
    assert lines.count("cleaned") == 1
    assert [w for w in lines if w != "cleaned"] in (["got", "table"], [])
