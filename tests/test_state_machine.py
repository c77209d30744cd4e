"""The whole state machine, driven by Hypothesis through random sequences of events.

A real once (unkeyed or keyed with maxsize=2, with ttl/refresh/cooldown/stale_if_error, a
generator value with a cleanup) runs in an event loop in a background thread (asyncio or trio).
Rules make calls and readiness kicks, finish or fail the runs of fn in flight, cancel callers,
move the fake clock, reset one key or all.
After every step: never two runs of fn for one key at once, no cleanup twice, no value served
after its cleanup, and each record holds exactly the data its state says applies (the table in
``fastapi_once._records``). The table's rows are walked: a call does what its key's state says
and moves it to the row's next state; a kick starts exactly where a call would; a run's outcome
moves its record as the table says; time moves a record only along the table's time rows;
status() says what the table's column says. A probe call behaves as status() said; at the end,
after reset_all(), every value made was cleaned up once.
Hypothesis prints a failing sequence of steps, which replays it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from timekeeping import FakeClock

from fastapi_once import _clock, once, reset_all
from fastapi_once._keys import NOKEY
from fastapi_once._readiness import kick
from fastapi_once._records import (
    CAN_REFRESH,
    FAILED,
    IDLE,
    PUBLIC,
    READY,
    READY_FAILING,
    READY_STALE,
    REFRESHES,
    REFRESHING,
    REFRESHING_FAILING,
    RUNNING,
    RUNNING_STALE,
    SERVING,
    STALE,
)

CONFIGS: list[dict[str, float]] = [
    {},
    {"ttl": 10},
    {"refresh": 5, "ttl": 10},
    {"cooldown": 4},
    {"refresh": 5, "ttl": 10, "cooldown": 3},
    {"ttl": 10, "stale_if_error": 12},
    {"refresh": 5, "ttl": 10, "stale_if_error": 7, "cooldown": 3},
    {"refresh": 5, "ttl": 10, "stale_if_error": 7, "jitter": 2},
]
KEYS = [None, "a", "b"]
# The table's call rows: the state a call that starts an attempt moves a record to.
STARTS = {
    IDLE: RUNNING,
    READY_STALE: RUNNING_STALE,
    READY: REFRESHING,
    READY_FAILING: REFRESHING_FAILING,
}
# The table's time rows: where time alone may move a record from each state.
BY_TIME = {
    IDLE: {IDLE},
    RUNNING: {RUNNING},
    RUNNING_STALE: {RUNNING_STALE, RUNNING},
    READY: {READY, READY_STALE, IDLE},
    READY_STALE: {READY_STALE, IDLE},
    READY_FAILING: {READY_FAILING, IDLE},
    REFRESHING: {REFRESHING, RUNNING_STALE, RUNNING},
    REFRESHING_FAILING: {REFRESHING_FAILING, RUNNING},
    FAILED: {FAILED, IDLE},
}
_names = itertools.count()


class OnceMachine(RuleBasedStateMachine):
    """Random sequences of calls, outcomes, cancellations, time and resets on one once."""

    def __init__(self) -> None:
        super().__init__()
        self.portal: BlockingPortal | None = None
        self.calls: list[concurrent.futures.Future[Any]] = []
        self.resets: list[concurrent.futures.Future[Any]] = []
        self.gates: list[tuple[anyio.Event, list[bool]]] = []
        self.gate_keys: list[object] = []  # the key of each run in ``gates``
        self.running: Counter[object] = Counter()
        self.started = 0
        self.made: list[int] = []
        self.cleaned: list[int] = []
        self.violations: list[str] = []

    @initialize(
        config=st.sampled_from(CONFIGS),
        keyed=st.booleans(),
        backend=st.sampled_from(["asyncio", "trio"]),
    )
    def start(self, config: dict[str, float], keyed: bool, backend: str) -> None:
        self.clock = FakeClock()
        self.saved = _clock.monotonic
        _clock.monotonic = self.clock
        self.portal_cm = start_blocking_portal(backend)
        self.portal = self.portal_cm.__enter__()
        self.keyed = keyed
        self.config = config

        async def make(key: object) -> AsyncIterator[int]:
            self.started += 1
            self.running[key] += 1
            if self.running[key] > 1:
                self.violations.append(f"two runs of fn for key {key!r}")
            gate, outcome = anyio.Event(), [True]
            self.gates.append((gate, outcome))
            self.gate_keys.append(key)
            try:
                await gate.wait()
            finally:
                self.running[key] -= 1
            if not outcome[0]:
                raise ConnectionError("fn failed")
            n = len(self.made) + 1
            self.made.append(n)
            yield n
            if n in self.cleaned:
                self.violations.append(f"value {n} cleaned up twice")
            self.cleaned.append(n)

        name = f"machine.{next(_names)}"
        if keyed:

            async def keyed_fn(k: str | None = None) -> AsyncIterator[int]:
                async for n in make(k):
                    yield n

            self.once: Any = once(keyed_fn, key=lambda k=None: k, maxsize=2, name=name, **config)
        else:

            async def fn() -> AsyncIterator[int]:
                async for n in make(None):
                    yield n

            self.once = once(fn, name=name, **config)

    def settle(self) -> None:
        assert self.portal is not None
        self.portal.call(anyio.wait_all_tasks_blocked)

    def records(self) -> dict[object, tuple[str, bool, tuple[str, bool, bool, bool, bool]]]:
        """Each record's state now, whether a call would start an attempt, and its stored state
        and which of its data are set (value, attempt, failure, retry_at). Looked at as every
        entry point looks at a record: the time rows applied first (which may drop it)."""
        assert self.portal is not None

        async def read() -> dict[object, tuple[str, bool, tuple[str, bool, bool, bool, bool]]]:
            now = _clock.monotonic()
            records = self.once.store_here().records
            for rec in list(records.values()):
                rec.advance(now)
            return {
                None if key is NOKEY else key: (
                    rec.due(now),
                    rec.begins(now),
                    (
                        rec.state,
                        rec.made is not None,
                        rec.attempt is not None,
                        rec.failure is not None,
                        rec.retry_at is not None,
                    ),
                )
                for key, rec in records.items()
            }

        return self.portal.call(read)

    def phase(self, key: object) -> tuple[str, bool]:
        """The state of ``key``'s record now, and whether a call would start an attempt."""
        state, begins, _ = self.records().get(key, (IDLE, True, ()))
        return state, begins

    def quiet(self) -> bool:
        """No reset is in flight (it waits for runs, then retires: rows of its own)."""
        return all(f.done() for f in self.resets)

    def call(self, key: object) -> concurrent.futures.Future[Any]:
        assert self.portal is not None
        fut = self.portal.start_task_soon(self.once, key) if self.keyed else None
        if fut is None:
            fut = self.portal.start_task_soon(self.once)
        fut.add_done_callback(self.check_served)
        self.calls.append(fut)
        return fut

    def check_served(self, fut: concurrent.futures.Future[Any]) -> None:
        """A call never returns a value whose cleanup has already run."""
        if not fut.cancelled() and fut.exception() is None and fut.result() in self.cleaned:
            self.violations.append(f"value {fut.result()} served after its cleanup")

    @rule(key=st.sampled_from(KEYS))
    def make_a_call(self, key: object) -> None:
        self.call(key)
        self.settle()

    @precondition(lambda self: bool(self.gates))
    @rule(succeed=st.booleans())
    def finish_the_oldest_run(self, succeed: bool) -> None:
        """The outcome rows: success -> ready; failure -> failed/idle, or ready-failing where a
        value is kept."""
        assert self.portal is not None
        key = self.gate_keys.pop(0)
        quiet = self.quiet()
        before, _ = self.phase(key)
        gate, outcome = self.gates.pop(0)
        outcome[0] = succeed
        self.portal.call(gate.set)
        self.settle()
        if not quiet or not self.quiet() or before not in (RUNNING, RUNNING_STALE, *REFRESHES):
            return
        after, _ = self.phase(key)
        if succeed:
            expected = {READY}
        elif before == RUNNING:
            expected = {FAILED} if self.config.get("cooldown") else {IDLE}
        else:
            expected = {READY_FAILING}
        assert after in expected, (before, succeed, after)

    @precondition(lambda self: all(f.done() for f in self.resets))
    @rule(key=st.sampled_from(KEYS))
    def a_call_follows_its_row(self, key: object) -> None:
        """The call rows: what a call gets, whether it starts an attempt, and the next state."""
        key = key if self.keyed else None
        state, begins = self.phase(key)
        started = self.started
        fut = self.call(key)
        self.settle()
        if state in (IDLE, READY_STALE):
            assert begins, state
        if state in (RUNNING, RUNNING_STALE, *REFRESHES, FAILED):
            assert not begins, state
        assert self.started == started + begins, state
        if state in SERVING:
            assert fut.done(), state
            assert fut.exception() is None, state
        elif state == FAILED:  # within its cooldown: the error at once
            assert fut.done(), state
            assert isinstance(fut.exception(), ConnectionError), state
        else:  # joins the attempt (started or in flight), whose run waits on its gate
            assert not fut.done(), state
        after, _ = self.phase(key)
        assert after == (STARTS[state] if begins else state), (state, begins, after)

    @precondition(lambda self: not self.keyed and all(f.done() for f in self.resets))
    @rule()
    def a_probe_kick_follows_the_start_rows(self) -> None:
        """A readiness probe's kick starts an attempt exactly where a call would, with the same
        next state, and never waits."""
        assert self.portal is not None
        state, begins = self.phase(None)
        started = self.started

        async def probe() -> bool:
            return kick(self.once, None)

        assert self.portal.call(probe) == begins, state
        self.settle()
        assert self.started == started + begins, state
        after, _ = self.phase(None)
        assert after == (STARTS[state] if begins else state), (state, begins, after)

    @rule(seconds=st.sampled_from([1, 3, 6, 11]))
    def time_moves_a_record_along_its_time_rows(self, seconds: float) -> None:
        before = {key: state for key, (state, _, _) in self.records().items()}
        self.clock.advance(seconds)
        after = {key: state for key, (state, _, _) in self.records().items()}
        for key, state in before.items():
            now = after.get(key, IDLE)  # an idle record is dropped
            assert now in BY_TIME[state], (key, state, now)

    @precondition(lambda self: any(not f.done() for f in self.calls))
    @rule(data=st.data())
    def cancel_a_caller(self, data: st.DataObject) -> None:
        pending = [f for f in self.calls if not f.done()]
        data.draw(st.sampled_from(pending)).cancel()
        self.settle()

    @rule(key=st.sampled_from([*KEYS, "all"]))
    def reset(self, key: object) -> None:
        assert self.portal is not None
        if key == "all":
            self.resets.append(self.portal.start_task_soon(reset_all))
        elif self.keyed:
            self.resets.append(self.portal.start_task_soon(self.once.reset, key))
        else:
            self.resets.append(self.portal.start_task_soon(self.once.reset))
        self.settle()

    @precondition(lambda self: not self.keyed and all(f.done() for f in self.resets))
    @rule()
    def probe_agrees_with_status(self) -> None:
        """What status() says is what the next call does."""
        state = self.once.status().state
        started = self.started
        fut = self.call(None)
        self.settle()
        if state in ("ready", "refreshing"):
            assert fut.done(), state
            assert fut.exception() is None, state
        elif state == "running":
            assert not fut.done(), state
            assert self.started == started, state
        elif state == "idle":
            assert self.started == started + 1, state
        else:  # failed: within a cooldown it fails fast, otherwise it tries again
            fast = fut.done() and isinstance(fut.exception(), ConnectionError)
            assert fast or self.started == started + 1, state

    @invariant()
    def nothing_runs_twice_or_is_cleaned_up_twice(self) -> None:
        assert not self.violations
        assert set(self.cleaned) <= set(self.made)

    @invariant()
    def each_record_holds_what_its_state_says(self) -> None:
        """The data beside the stored state apply exactly where the table's preamble says."""
        if self.portal is None:
            return
        stale_if_error, cooldown = "stale_if_error" in self.config, "cooldown" in self.config
        for key, (_, _, (state, made, attempt, failure, retry_at)) in self.records().items():
            assert state != IDLE, (key, "an idle record is dropped")
            assert made == (state in (RUNNING_STALE, *CAN_REFRESH, READY_STALE, *REFRESHES))
            assert attempt == (state in (RUNNING, RUNNING_STALE, *REFRESHES)), (key, state)
            assert failure == (state == FAILED), (key, state)
            assert not retry_at or state == READY_FAILING, (key, state)
            assert stale_if_error or state not in STALE, (key, state)
            assert cooldown or state != FAILED, (key, state)
        if not self.keyed:  # status() reads the state (idle after a failure: failed)
            state, status = self.records().get(None, (IDLE,))[0], self.once.status()
            failed = state == IDLE and status.last_error_type is not None
            assert status.state == ("failed" if failed else PUBLIC[state]), state  # type: ignore[index]

    def teardown(self) -> None:
        if self.portal is None:
            return
        try:
            for _ in range(200):
                while self.gates:
                    gate, _outcome = self.gates.pop(0)
                    self.portal.call(gate.set)
                self.settle()
                if all(f.done() for f in [*self.calls, *self.resets]) and not self.gates:
                    break
            assert all(f.done() for f in [*self.calls, *self.resets]), "a call or reset hangs"
            for fut in self.resets:
                assert fut.cancelled() or fut.exception() is None
            self.portal.call(reset_all)
            assert sorted(self.cleaned) == sorted(self.made)
            assert not self.violations
        finally:
            self.portal_cm.__exit__(None, None, None)
            _clock.monotonic = self.saved


OnceMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_state_machine = pytest.mark.timeout(240)(OnceMachine.TestCase)
