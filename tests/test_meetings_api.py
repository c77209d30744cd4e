"""Where stale_if_error=, methods, jitter= and per-key reset meet the other options."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceCycleError, OnceTimeoutError, once, once_lifespan, readiness_router
from fastapi_once._loops import forget_everything
from fastapi_once.testing import override

pytestmark = pytest.mark.anyio


async def test_a_timed_out_attempt_still_running_past_the_window_gives_no_retired_value(
    clock: FakeClock,
) -> None:
    """timeout=: once the window has ended, a call joining the hung attempt gets the timeout,
    not the stale value that was retired (and cleaned up) at the window's end."""
    gate = anyio.Event()
    runs: list[int] = []
    closed: list[int] = []

    async def make() -> AsyncIterator[int]:
        runs.append(len(runs) + 1)
        mine = len(runs)
        if mine > 1:
            with anyio.CancelScope(shield=True):  # ignores the timeout's cancellation
                await gate.wait()
            raise ConnectionError("down")
        yield mine
        closed.append(mine)

    get = once(make, ttl=10, stale_if_error=30, timeout=0.05)
    assert await get() == 1
    clock.advance(11)
    assert await get() == 1  # run 2 timed out within the window: the stale value
    clock.advance(30)  # the window is over; run 2 still hangs
    try:
        with pytest.raises(OnceTimeoutError):
            await get()
        await wait_until(lambda: closed == [1])
    finally:
        gate.set()
    await wait_until(lambda: get.status().state != "running")


class Loader:
    """Once methods that call each other (and themselves)."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.gate: anyio.Event | None = None

    def count(self, name: str) -> None:
        self.runs[name] = self.runs.get(name, 0) + 1

    @once
    async def base(self) -> str:
        self.count("base")
        if self.gate is not None:
            await self.gate.wait()
        return "base"

    @once
    async def derived(self) -> str:
        self.count("derived")
        return f"{await self.base()}+derived"

    @once
    async def itself(self) -> str:
        return await self.itself()

    @once(key=lambda name: name)
    async def keyed(self, name: str | None) -> str:
        self.count(f"keyed {name}")
        return f"{name} #{self.runs[f'keyed {name}']}"

    @once(key=lambda name: name)
    async def resets_own_key(self, name: str) -> str:
        await self.resets_own_key.reset(name)
        return name


async def test_a_method_calling_another_once_method_of_its_instance_shares_that_value() -> None:
    """A once method awaiting another of the same instance makes each value once."""
    loader = Loader()
    assert await loader.derived() == "base+derived"
    assert await loader.base() == "base"
    assert loader.runs == {"base": 1, "derived": 1}


async def test_a_method_that_awaits_itself_raises_a_cycle_error() -> None:
    """A method awaiting its own once raises OnceCycleError instead of hanging."""
    loader = Loader()
    with anyio.fail_after(5), pytest.raises(OnceCycleError):
        await loader.itself()


async def test_a_keyed_methods_key_none_is_reset_alone_per_instance() -> None:
    """reset(None) on a keyed method resets key None of that instance only."""
    one, two = Loader(), Loader()
    assert await one.keyed(None) == "None #1"
    assert await one.keyed("a") == "a #1"
    assert await two.keyed(None) == "None #1"
    await one.keyed.reset(None)
    assert await one.keyed(None) == "None #2"
    assert await one.keyed("a") == "a #1"
    assert await two.keyed(None) == "None #1"


async def test_a_per_key_reset_from_inside_that_keys_run_raises_a_cycle_error() -> None:
    """reset(key) from the run of that key would wait for itself: OnceCycleError."""
    loader = Loader()
    with anyio.fail_after(5), pytest.raises(OnceCycleError):
        await loader.resets_own_key("a")


async def test_a_per_key_reset_waits_for_the_keys_run_and_the_next_call_makes_it_anew() -> None:
    """reset(key) during that key's run: the run's value is cleaned up, not served after."""
    closed: list[str] = []
    runs: list[str] = []
    gate = anyio.Event()

    @once(key=lambda k: k)
    async def get(k: str) -> AsyncIterator[str]:
        runs.append(k)
        if len(runs) == 1:
            await gate.wait()
        yield f"{k} #{len(runs)}"
        closed.append(f"{k} #{len(runs)}")

    async with anyio.create_task_group() as group:
        first: list[str] = []

        async def call() -> None:
            first.append(await get("a"))

        group.start_soon(call)
        await wait_until(lambda: runs == ["a"])
        reset_done = anyio.Event()

        async def reset() -> None:
            await get.reset("a")
            reset_done.set()

        group.start_soon(reset)
        await anyio.sleep(0.01)
        assert not reset_done.is_set()  # it waits for the run
        gate.set()
        await reset_done.wait()
    assert first == ["a #1"]  # the caller that waited got the run's value
    assert closed == ["a #1"]  # and reset cleaned it up before returning
    assert get.status().state == "idle"
    assert await get("a") == "a #2"


class Pool:
    """A generator method (self is a weak proxy) whose run may be held on a gate."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed: list[str] = []
        self.gate: anyio.Event | None = None
        self.started: list[str] = []

    @once(refresh=5, ttl=10)
    async def conn(self) -> AsyncIterator[str]:
        closed, gate = self.closed, self.gate
        made = f"{self.name} #{len(self.started) + 1}"
        self.started.append(made)
        if gate is not None:
            await gate.wait()
        yield made
        closed.append(made)


async def test_an_instance_collected_while_callers_wait_gives_them_the_value_then_cleans_it_up(
    clock: FakeClock,
) -> None:
    """The instance goes while its first run is in flight: the waiters get the value, and its
    cleanup runs once afterwards; nothing is left behind."""
    pool = Pool("p")
    closed, started, gate = pool.closed, pool.started, anyio.Event()
    pool.gate = gate
    got: list[str] = []
    async with anyio.create_task_group() as group:
        method = pool.conn

        async def call() -> None:
            got.append(await method())

        for _ in range(3):
            group.start_soon(call)
        await wait_until(lambda: len(started) == 1 and method.status().joins == 2)
        gone = weakref.ref(pool)
        del pool
        gc.collect()
        assert gone() is None
        gate.set()
    assert got == ["p #1"] * 3
    await wait_until(lambda: closed == ["p #1"])
    await anyio.sleep(0.01)
    assert closed == ["p #1"]
    with pytest.raises(ReferenceError):
        await method()


async def test_an_instance_collected_during_a_refresh_cleans_up_both_values_once(
    clock: FakeClock,
) -> None:
    """The instance goes while a background refresh runs: the old value and the refresh's value
    are each cleaned up exactly once."""
    pool = Pool("p")
    closed, started = pool.closed, pool.started
    assert await pool.conn() == "p #1"
    clock.advance(6)
    pool.gate = gate = anyio.Event()
    assert await pool.conn() == "p #1"  # starts the refresh, which waits on the gate
    await wait_until(lambda: len(started) == 2)
    gone = weakref.ref(pool)
    del pool
    gc.collect()
    assert gone() is None
    gate.set()
    await wait_until(lambda: sorted(closed) == ["p #1", "p #2"])
    await anyio.sleep(0.01)
    assert sorted(closed) == ["p #1", "p #2"]


class Upstream:
    """A maker that fails on demand, may hold its runs on a gate, and records cleanups."""

    def __init__(self) -> None:
        self.runs = 0
        self.failing = False
        self.gate: anyio.Event | None = None
        self.closed: list[int] = []

    async def make(self) -> AsyncIterator[int]:
        self.runs += 1
        mine = self.runs
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionError(f"run {mine} failed")
        yield mine
        self.closed.append(mine)


def state_of(target: Any) -> tuple[str, bool]:
    """status()'s state and whether it reports a stale value."""
    status = target.status()
    return status.state, status.stale


async def test_status_says_what_the_next_call_does_at_every_step_of_a_stale_window(
    clock: FakeClock,
) -> None:
    """status() along a window: ready, idle+stale, running+stale, ready+stale, refreshing+stale,
    ready+stale, then running (the window over, the attempt joined), then failed."""
    up = Upstream()
    get = once(up.make, ttl=10, stale_if_error=30, cooldown=5)
    assert state_of(get) == ("idle", False)
    assert await get() == 1
    assert state_of(get) == ("ready", False)
    clock.advance(11)
    assert state_of(get) == ("idle", True)
    up.failing, up.gate = True, anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(get)
        await wait_until(lambda: up.runs == 2)
        assert state_of(get) == ("running", True)
        up.gate.set()
    assert state_of(get) == ("ready", True)
    assert await get() == 1  # within the cooldown: no attempt
    assert up.runs == 2
    clock.advance(6)
    up.gate = anyio.Event()
    assert await get() == 1  # served at once; attempt 3 starts behind it
    await wait_until(lambda: up.runs == 3)
    assert state_of(get) == ("refreshing", True)
    up.gate.set()
    await wait_until(lambda: state_of(get) == ("ready", True))
    clock.advance(6)
    up.gate = anyio.Event()
    assert await get() == 1
    await wait_until(lambda: up.runs == 4)
    clock.advance(30)  # the window ends while attempt 4 runs
    assert state_of(get) == ("running", False)
    async with anyio.create_task_group() as group:
        failures: list[BaseException] = []

        async def call() -> None:
            try:
                await get()
            except ConnectionError as exc:
                failures.append(exc)

        group.start_soon(call)
        await wait_until(lambda: get.status().joins >= 1)
        up.gate.set()
    assert len(failures) == 1
    assert state_of(get) == ("failed", False)
    await wait_until(lambda: up.closed == [1])
    assert up.closed == [1]


async def test_cooldown_spaces_background_attempts_whose_retries_all_fail(
    clock: FakeClock,
) -> None:
    """retries= and cooldown=: one background attempt of 1 + retries tries per cooldown."""
    up = Upstream()
    get = once(up.make, ttl=10, stale_if_error=60, cooldown=20, retries=2, backoff=0)
    assert await get() == 1
    clock.advance(11)
    up.failing = True
    assert await get() == 1  # tries 2, 3, 4 failed
    assert up.runs == 4
    clock.advance(10)
    assert await get() == 1
    await anyio.sleep(0.01)
    assert up.runs == 4  # the cooldown lasts
    clock.advance(11)
    assert await get() == 1
    await wait_until(lambda: up.runs == 7 and get.status().state == "ready")
    assert await get() == 1
    up.failing = False
    clock.advance(21)
    assert await get() == 1  # the next background attempt succeeds behind it
    await wait_until(lambda: get.status().state == "ready" and up.runs == 8)
    assert await get() == 8
    assert state_of(get) == ("ready", False)
    await wait_until(lambda: up.closed == [1])


async def test_a_failing_stale_key_is_not_evicted_while_its_background_attempt_runs(
    clock: FakeClock,
) -> None:
    """maxsize: a stale key whose background attempt runs is skipped by eviction; once that
    attempt has settled the key goes like any other, cleaned up once."""
    closed: list[str] = []
    failing: set[str] = set()
    gates: dict[str, anyio.Event] = {}

    @once(key=lambda k: k, maxsize=1, ttl=10, stale_if_error=30)
    async def get(k: str) -> AsyncIterator[str]:
        gate = gates.get(k)
        if gate is not None:
            await gate.wait()
        if k in failing:
            raise ConnectionError(k)
        yield k
        closed.append(k)

    assert await get("a") == "a"
    clock.advance(11)
    failing.add("a")
    assert await get("a") == "a"  # failing: stale served
    gates["a"] = anyio.Event()
    assert await get("a") == "a"  # a background attempt starts and waits
    await wait_until(lambda: get.status().state == "refreshing")
    assert await get("b") == "b"  # "a" is in flight: kept
    assert closed == []
    assert await get("a") == "a"
    gates["a"].set()
    await wait_until(lambda: closed == ["b"])  # "a" settled (failing): "b" is least recent
    assert await get("c") == "c"
    await wait_until(lambda: closed == ["b", "a"])


def test_a_process_scope_once_serves_its_stale_value_to_sync_callers(clock: FakeClock) -> None:
    """scope="process": past the ttl a failed attempt gives get_sync() the stale value; past
    the window the failure is raised and the stale value is cleaned up once."""
    runs: list[int] = []
    closed: list[int] = []
    failing = False

    def make() -> Iterator[int]:
        runs.append(len(runs) + 1)
        mine = len(runs)
        if failing:
            raise ConnectionError(f"run {mine} failed")
        yield mine
        closed.append(mine)

    get = once(make, ttl=10, stale_if_error=30, scope="process")
    try:
        assert get.get_sync() == 1
        clock.advance(11)
        failing = True
        assert get.get_sync() == 1  # attempt 2 failed: the stale value
        assert get.get_sync() == 1  # served; an attempt runs behind it
        assert get.status().stale
        clock.advance(30)
        with pytest.raises(ConnectionError):
            get.get_sync()
        give_up = time.monotonic() + 5
        while closed != [1] and time.monotonic() < give_up:  # cleaned up in the scope's loop
            time.sleep(0.001)
    finally:
        forget_everything()
    assert closed == [1]


class Keyed:
    """A keyed once method reached through a route."""

    def __init__(self) -> None:
        self.runs: list[str | None] = []

    @once(key=lambda name: name)
    async def table(self, name: str | None = None) -> str:
        self.runs.append(name)
        return f"table {name}"


def test_a_route_depends_on_a_keyed_method_whose_key_may_be_none() -> None:
    """Depends(obj.method) with key None (the query parameter left out) makes that key once."""
    keyed = Keyed()
    app = FastAPI()

    @app.get("/table")
    async def table(value: str = Depends(keyed.table)) -> str:
        return value

    with TestClient(app) as client:
        assert client.get("/table").json() == "table None"
        assert client.get("/table").json() == "table None"
        assert client.get("/table", params={"name": "a"}).json() == "table a"
        assert client.get("/table").json() == "table None"
    assert keyed.runs == [None, "a"]


class Same:
    """Instances that are all equal (and hash alike)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same)

    def __hash__(self) -> int:
        return 0

    @once
    async def value(self) -> str:
        return self.name


async def test_instances_equal_by_eq_still_have_their_own_values() -> None:
    """Binding is by identity: two equal instances never share a value."""
    one, two = Same("one"), Same("two")
    assert await one.value() == "one"
    assert await two.value() == "two"
    assert one.value is not two.value


async def test_override_of_a_stale_once_serves_the_stand_in_and_then_makes_anew(
    clock: FakeClock,
) -> None:
    """testing.override during a stale window: the stale value is cleaned up, the stand-in is
    served past any ttl, and after the block the once makes its own value."""
    up = Upstream()
    get = once(up.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    up.failing = True
    assert await get() == 1
    async with override(get, 99):
        assert up.closed == [1]
        clock.advance(100)
        assert await get() == 99
    up.failing = False
    assert await get() == 3
    assert up.closed == [1]


@pytest.mark.parametrize(
    "stack",
    [
        lambda f: once(classmethod(f)),
        lambda f: classmethod(once(f)),
        lambda f: once(classmethod(f), key=lambda name: name),
        lambda f: classmethod(once(f, key=lambda name: name)),
    ],
    ids=["once-outside", "classmethod-outside", "keyed-once-outside", "keyed-classmethod-outside"],
)
def test_once_over_a_classmethod_is_refused_with_a_fix_that_works(
    stack: Callable[[Any], Any],
) -> None:
    """@once with @classmethod (either stacking order, with or without key=) is refused, and
    the message gives a form that works rather than the other order."""

    async def make(cls: type, name: str = "") -> str:
        return cls.__name__ + name

    make.__qualname__ = "Settings.make"
    with pytest.raises(TypeError, match=r"classmethod.*once\(Settings\.make\)") as refused:
        stack(make)
    assert "request data" not in str(refused.value)


async def test_once_of_a_classmethod_bound_to_its_class_makes_one_value() -> None:
    """once(Cls.method) after the class body: one value for the class, as the fix says."""

    class Settings:
        runs = 0

        @classmethod
        async def make(cls) -> str:
            cls.runs += 1
            return cls.__name__

    get = once(Settings.make)
    assert await get() == await get() == "Settings"
    assert Settings.runs == 1


async def test_a_keyed_once_of_a_classmethod_bound_to_its_class_keeps_one_value_per_key() -> None:
    """once(Cls.method, key=...) after the class body: the documented keyed form works."""

    made: list[str] = []

    class Tables:
        @classmethod
        async def table(cls, name: str) -> str:
            made.append(name)
            return f"{cls.__name__}/{name}"

    get = once(Tables.table, key=lambda name: name)
    assert await get("a") == await get("a") == "Tables/a"
    assert await get("b") == "Tables/b"
    assert made == ["a", "b"]


async def test_once_stacks_with_staticmethod_in_either_order() -> None:
    """@once and @staticmethod in either order: one value, reached from the class or an instance."""
    runs: list[str] = []

    class Config:
        @staticmethod
        @once
        async def inner() -> str:
            runs.append("inner")
            return "inner"

        @once
        @staticmethod
        async def outer() -> str:
            runs.append("outer")
            return "outer"

    for _ in range(2):
        assert await Config.inner() == await Config().inner() == "inner"
        assert await Config.outer() == await Config().outer() == "outer"
    assert runs == ["inner", "outer"]


class Shop:
    """A class whose once method is reached, by mistake, through the class."""

    @once
    async def pool(self) -> str:
        return "pool"


def test_a_route_on_the_class_level_method_fails_with_the_fix() -> None:
    """Depends(Cls.method) has no instance: the error says to depend on an instance's once."""
    app = FastAPI()

    @app.get("/")
    async def route(value: str = Depends(Shop.pool)) -> str:
        return value

    with TestClient(app) as client, pytest.raises(TypeError, match=r"Depends\(obj\.pool\)"):
        client.get("/")


async def test_reset_and_status_on_the_class_level_method_say_to_use_an_instance() -> None:
    """Cls.method.reset() / .status(): the error names obj.method and reset_all()."""
    with pytest.raises(TypeError, match=r"obj\.pool\.reset\(\).*reset_all\(\)"):
        await Shop.pool.reset()
    with pytest.raises(TypeError, match=r"obj\.pool\.status\(\)"):
        Shop.pool.status()
    shop = Shop()
    assert await Shop.pool(shop) == "pool"


async def test_a_refresh_timed_out_before_the_ttl_and_still_running_past_it_is_a_failure(
    clock: FakeClock,
) -> None:
    """refresh= and timeout=: a background refresh that timed out before the ttl counts as a
    failed refresh; past the ttl, while the run still goes on, the value is served at once
    (stale_if_error=), not the timeout; past the window the timeout reaches the callers."""
    gate = anyio.Event()
    runs: list[int] = []

    async def make() -> AsyncIterator[int]:
        runs.append(len(runs) + 1)
        if len(runs) > 1:
            with anyio.CancelScope(shield=True):  # ignores the timeout's cancellation
                await gate.wait()
            raise ConnectionError("down")
        yield 1

    get = once(make, refresh=5, ttl=10, stale_if_error=30, timeout=0.05)
    assert await get() == 1
    clock.advance(6)
    try:
        assert await get() == 1  # starts the refresh, which hangs
        await wait_until(lambda: get.status().last_error_type == "OnceTimeoutError")
        clock.advance(5)  # past the ttl; the refresh still runs
        assert await get() == 1
        assert (get.status().state, get.status().stale) == ("refreshing", True)
        clock.advance(30)
        with pytest.raises(OnceTimeoutError):
            await get()
    finally:
        gate.set()
    await wait_until(lambda: get.status().state != "running")
    assert runs == [1, 2]


async def test_reset_during_a_background_attempt_cleans_up_the_stale_and_the_new_value_once(
    clock: FakeClock,
) -> None:
    """reset() while a stale value is served and an attempt runs behind it: reset waits for the
    attempt; both the stale value and the one the attempt made are cleaned up, each once."""
    up = Upstream()
    get = once(up.make, ttl=10, stale_if_error=30)
    assert await get() == 1
    clock.advance(11)
    up.failing = True
    assert await get() == 1  # attempt 2 failed: stale and failing
    up.failing, up.gate = False, anyio.Event()
    assert await get() == 1  # attempt 3 starts behind it
    await wait_until(lambda: up.runs == 3)
    async with anyio.create_task_group() as group:
        group.start_soon(get.reset)
        await wait_until(lambda: get.status().state == "refreshing")
        up.gate.set()
    assert sorted(up.closed) == [1, 3]
    assert get.status().state == "idle"
    assert await get() == 4


def test_a_process_scope_method_value_is_cleaned_up_when_its_instance_is_collected() -> None:
    """scope="process" on a method: collecting the instance cleans its value up once, in the
    process scope's loop, and forgets its once."""
    closed: list[str] = []

    class Model:
        def __init__(self, name: str) -> None:
            self.name = name

        @once(scope="process")
        def weights(self) -> Iterator[str]:
            name = self.name
            yield f"weights of {name}"
            closed.append(name)

    try:
        model = Model("m")
        assert model.weights.get_sync() == model.weights.get_sync() == "weights of m"
        made = weakref.ref(model.weights)
        del model
        gc.collect()
        give_up = time.monotonic() + 5
        while (closed != ["m"] or made() is not None) and time.monotonic() < give_up:
            time.sleep(0.001)
            gc.collect()
        assert closed == ["m"]
        assert made() is None
    finally:
        forget_everything()
    assert closed == ["m"]


async def test_jitter_moves_refresh_ttl_and_the_stale_window_together(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jitter= with refresh= and stale_if_error=: the one draw per value moves the refresh, the
    ttl and so the window's end (draw fixed at 2 s here)."""
    from fastapi_once import _policy

    monkeypatch.setattr(_policy.random, "uniform", lambda low, high: (low + high) / 2)
    up = Upstream()
    get = once(up.make, refresh=5, ttl=10, stale_if_error=30, jitter=4)
    assert await get() == 1
    clock.advance(6.5)  # before the jittered refresh (7 s)
    assert await get() == 1
    await anyio.sleep(0.01)
    assert up.runs == 1
    clock.advance(1)  # past it: a refresh starts and fails
    up.failing = True
    assert await get() == 1
    await wait_until(lambda: up.runs == 2 and get.status().state == "ready")
    clock.advance(34)  # 41.5 s: within the jittered window (ttl 12 s + 30 s)
    assert await get() == 1
    await wait_until(lambda: get.status().state == "ready")
    status = get.status()
    assert status.stale
    clock.advance(1)  # 42.5 s: the window is over
    with pytest.raises(ConnectionError):
        await get()
    await wait_until(lambda: up.closed == [1])


def test_a_route_on_an_instances_once_can_be_overridden_and_the_override_removed() -> None:
    """app.dependency_overrides[obj.method]: obj.method is one object for obj's life, so the
    override applies, and once removed the instance's own value is made once."""
    loader = Loader()
    app = FastAPI()

    @app.get("/base")
    async def base(value: str = Depends(loader.base)) -> str:
        return value

    app.dependency_overrides[loader.base] = lambda: "stand-in"
    with TestClient(app) as client:
        assert client.get("/base").json() == "stand-in"
        assert loader.runs == {}
        del app.dependency_overrides[loader.base]
        assert client.get("/base").json() == "base"
        assert client.get("/base").json() == "base"
    assert loader.runs == {"base": 1}


async def test_override_of_an_instances_once_leaves_other_instances_alone() -> None:
    """testing.override(obj.method, v) pins that instance's value only."""
    one, two = Loader(), Loader()
    async with override(one.base, "stand-in"):
        assert await one.base() == "stand-in"
        assert await two.base() == "base"
    assert await one.base() == "base"
    assert one.runs == two.runs == {"base": 1}


@pytest.mark.parametrize(
    ("where", "use"),
    [
        ("once_lifespan", lambda target: once_lifespan(target)),
        ("readiness_router", lambda target: readiness_router(target)),
    ],
)
def test_the_class_level_method_given_where_a_once_is_needed_is_refused_with_the_fix(
    where: str, use: Callable[[Any], Any]
) -> None:
    """once_lifespan(Cls.method) / readiness_router(Cls.method): no instance, so no value; the
    error says to pass an instance's once."""
    with pytest.raises(TypeError, match=rf"{where}\(.*Shop\.pool\).*obj\.pool"):
        use(Shop.pool)


async def test_override_of_the_class_level_method_is_refused_with_the_fix() -> None:
    """testing.override(Cls.method, v): the error says to override an instance's once."""
    with pytest.raises(TypeError, match=r"override\(.*Shop\.pool\).*obj\.pool"):
        async with override(Shop.pool, "stand-in"):  # type: ignore[arg-type]
            pass  # pragma: no cover - refused on entry


@pytest.mark.parametrize("cooldown", [None, 10])
async def test_resetting_the_key_that_failed_last_leaves_status_idle(
    cooldown: float | None,
) -> None:
    """reset(key) of the key whose attempt failed last forgets that error: status() says idle,
    as after reset(); resetting another key keeps it."""
    options: dict[str, Any] = {} if cooldown is None else {"cooldown": cooldown}

    @once(key=lambda k: k, **options)
    async def get(k: str) -> str:
        if k == "bad":
            raise ConnectionError(k)
        return k

    assert await get("good") == "good"
    with pytest.raises(ConnectionError):
        await get("bad")
    await get.reset("good")
    assert (get.status().state, get.status().last_error_type) == ("failed", "ConnectionError")
    await get.reset("bad")
    assert (get.status().state, get.status().last_error_type) == ("idle", None)


class Recursive:
    """Once methods of other kinds that reach their own once."""

    @once
    async def gen(self) -> AsyncIterator[int]:
        yield await self.gen()  # self is a weak proxy here

    @once
    def blocking(self) -> int:
        return anyio.from_thread.run(self.blocking)


@pytest.mark.parametrize("method", ["gen", "blocking"])
async def test_a_generator_or_def_method_reaching_its_own_once_raises_a_cycle_error(
    method: str,
) -> None:
    """Through a weak-proxy self or from its worker thread: OnceCycleError, never a hang."""
    recursive = Recursive()
    with anyio.fail_after(5), pytest.raises(OnceCycleError):
        await getattr(recursive, method)()


async def test_reset_with_an_unhashable_key_names_the_once_and_the_fix() -> None:
    """reset(key) whose key cannot be hashed fails as the call would, made values or not."""

    @once(key=lambda items: items)
    async def get(items: Any) -> int:
        return len(items)

    with pytest.raises(TypeError, match=r"the key of .*get is an unhashable list"):
        await get.reset(["a"])
    assert await get(("a",)) == 1
    with pytest.raises(TypeError, match=r"the key of .*get is an unhashable list"):
        await get.reset(["a"])


async def test_a_def_run_that_outlives_its_timeout_and_the_window_gives_no_retired_value(
    clock: FakeClock,
) -> None:
    """timeout= on a def (a thread cannot be cancelled): past the window, a call joining the
    run gets the timeout, and the stale value is cleaned up once."""
    release = threading.Event()
    runs: list[int] = []
    closed: list[int] = []

    def make() -> Iterator[int]:
        runs.append(len(runs) + 1)
        mine = len(runs)
        if mine > 1:
            release.wait(10)
            raise ConnectionError("down")
        yield mine
        closed.append(mine)

    get = once(make, ttl=10, stale_if_error=30, timeout=0.05)
    assert await get() == 1
    clock.advance(11)
    try:
        assert await get() == 1  # run 2 timed out within the window: the stale value
        clock.advance(30)
        with pytest.raises(OnceTimeoutError):
            await get()
        await wait_until(lambda: closed == [1])
    finally:
        release.set()
    await wait_until(lambda: get.status().state != "running")
    assert closed == [1]
