"""A once's state machine: one record per (once, event loop, key), its state and transitions.

An unkeyed once is the key-less case of the same store. Every transition is a method of
``Record``, and every entry point (a call's slow path, the readiness kick, reset, teardown, the
task keeping a value) goes through them; whether an attempt starts is one rule,
``Record.begins``, for calls and probes alike. This one table is the whole machine.

The state is stored whole in ``Record.state``, sub-states included: *stale* (the value is past
its ttl, kept until ttl + S under ``stale_if_error=S``, not served) and *failing* (a try to
replace the value failed: it is served, past its ttl too, until ttl + S). What a call gets is
decided by the state alone; beside it a record keeps only data that its state says applies: the
value ``made`` (in running-stale, ready*, refreshing*), the ``attempt`` in flight (in running*
and refreshing*), the ``failure`` and the end of its cooldown (in failed), and ``retry_at``, the
end of a failed replacement's cooldown (only in ready-failing; None without ``cooldown=``).

    state               a call                                  status() says
    idle                starts an attempt and joins it          idle
    running             joins the attempt                       running
    running-stale       joins the attempt (a value is kept)     running, stale
    ready               gets the value (a due refresh starts)   ready
    ready-stale         starts an attempt and joins it          idle, stale
    ready-failing       gets the value (a due refresh starts    ready (stale past the ttl)
                        once retry_at has passed)
    refreshing          gets the value                          refreshing
    refreshing-failing  gets the value                          refreshing (stale past the ttl)
    failed              gets the error at once                  failed

    state               event                 next                side effect
    idle                call, kick            running             start one attempt in a library
                                                                  task
    running, running-   call                  the same            join it (closing a cycle raises
    stale                                                         instead)
    running, running-   attempt succeeds      ready               serve the value; wake the
    stale                                                         waiters; retire a value kept
    running             attempt fails         failed / idle       wake the waiters with the error;
                                                                  failed while cooldown= lasts
    running-stale       attempt fails         ready-failing       wake the waiters with the value
                                                                  kept; retry_at = cooldown's end
    running, running-   timeout               the same            wake the waiters (as on a
    stale                                                         failure); the run goes on, and
                                                                  calls joining it get the same
    ready               call, kick: refresh   refreshing          start one refresh; serve the
                        due                                       value
    ready-failing       call, kick: refresh   refreshing-failing  the same, not before retry_at
                        due
    ready               ttl ends              idle                retire the value
    ready               ttl ends, S           ready-stale         keep the value, not served
    ready-stale         call, kick            running-stale       start one attempt; calls join it
    refreshing,         call                  the same            serve the value
    refreshing-failing
    refreshing,         refresh succeeds      ready               serve the new value; retire the
    refreshing-failing                                            old
    refreshing,         refresh fails         ready-failing       keep serving; retry_at =
    refreshing-failing                                            cooldown's end
    refreshing          timeout               refreshing-failing  keep serving; the run goes on
    refreshing          ttl ends              running /           calls join the refresh; the
                                              running-stale (S)   value is retired, or kept (S)
    refreshing-failing  ttl ends              the same            keep serving the value
    failed              call                  failed              raise the attempt's error
    failed              cooldown ends         idle                forget the error
    running-stale,      ttl + S ends          running             retire the value; the next
    refreshing-failing                                            failure reaches the callers
    ready-stale,        ttl + S ends          idle                retire the value
    ready-failing
    any                 reset, eviction,      idle                after work in flight settles:
                        teardown                                  retire

Where options meet it: a failed ``refresh=`` before the ttl makes the value failing, so past
the ttl it is served at once; ``cooldown=`` spaces the attempts made while a failing value is
served (``retry_at``); ``jitter=`` moves the ttl and so ttl + S; ``retries=`` are tries within
one attempt, whose final failure is the one that counts; a ``timeout=`` is a failure (the
waiters get the stale value when it strikes; a refresh it strikes is failing while its run goes
on; a run going on past ttl + S does not keep the value: it is retired then, and calls joining
the run get its timeout). Reset, eviction and teardown retire a stale value like any other (its
cleanup runs once); each key of a keyed once (``None`` included) has its own record, so its own
stale value. ``status()`` reads each record's state as of now (``Record.due``: the time rows
applied), mapped by ``PUBLIC`` (the column above), plus ``stale`` and ``stale_until`` while a
value is kept past its ttl; after shutdown a due attempt is refused with ``OnceClosedError`` as
any refresh is.

An idle record is dropped from its store. The time rows are applied by ``Record.advance`` when
an entry point looks at a record, and on time by the task that keeps a value with a cleanup.
A retired value's cleanup runs exactly once in the task that made it; the store lists retired
values until then, and reset and teardown await them.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from contextlib import AsyncExitStack
from typing import Any, Literal, Protocol, cast

import anyio

from . import _clock
from ._attempts import Attempt, raise_again
from ._errors import OnceCancelledError, OnceClosedError
from ._events import event_factory, new_event, proves_thread, unproven
from ._loops import LoopState, in_process_loop
from ._policy import Policy
from ._status import State
from ._tasks import spawn, spawner
from ._telemetry import ended, error_type, fast_failed, fields, register, traced, waits
from ._values import Value

logger = logging.getLogger("fastapi_once")


# A record's state, sub-states included (see the table above).
Phase = Literal[
    "idle",
    "running",
    "running-stale",
    "ready",
    "ready-stale",
    "ready-failing",
    "refreshing",
    "refreshing-failing",
    "failed",
]
IDLE: Phase = "idle"
RUNNING: Phase = "running"
RUNNING_STALE: Phase = "running-stale"
READY: Phase = "ready"
READY_STALE: Phase = "ready-stale"
READY_FAILING: Phase = "ready-failing"
REFRESHING: Phase = "refreshing"
REFRESHING_FAILING: Phase = "refreshing-failing"
FAILED: Phase = "failed"
# What status() says of each state (the table's last column).
PUBLIC: dict[Phase, State] = {
    IDLE: "idle",
    RUNNING: "running",
    RUNNING_STALE: "running",
    READY: "ready",
    READY_STALE: "idle",
    READY_FAILING: "ready",
    REFRESHING: "refreshing",
    REFRESHING_FAILING: "refreshing",
    FAILED: "failed",
}
SERVING = (READY, READY_FAILING, REFRESHING, REFRESHING_FAILING)  # a call gets the value
FAILING = (READY_FAILING, REFRESHING_FAILING)  # served past the ttl, until ttl + S
STALE = (RUNNING_STALE, READY_STALE)  # kept past the ttl, not served
REFRESHES = (REFRESHING, REFRESHING_FAILING)  # a refresh in flight
CAN_REFRESH = (READY, READY_FAILING)  # served, and may start a refresh

Resolve = Callable[[AsyncExitStack], Awaitable[dict[str, Any]]]


class Injector(Protocol):
    """Supplies extra keyword arguments (sub-dependencies) when a value is made."""

    param: str  # the hidden keyword argument through which a caller passes its context

    def bind(self, context: object) -> Resolve:
        """Return what resolves the keyword arguments for ``context`` (e.g. the app)."""


# What runs an attempt: (record, attempt, args, kwargs, resolve) -> never raises.
Work = Callable[
    ["Record", Attempt, tuple[Any, ...], dict[str, Any], "Resolve | None"],
    Coroutine[Any, Any, None],
]


class Record:
    """One key's life in one loop; all of a once's transitions (see the table above)."""

    __slots__ = (
        "attempt", "failure", "key", "made", "retry_at", "state", "store", "until",
    )  # fmt: skip

    def __init__(self, store: Store, key: Hashable) -> None:
        self.store, self.key = store, key
        self.state: Phase = IDLE  # changed only by this class's transitions
        # The value: served in ready*, refreshing*; in running-stale and ready-stale, kept
        # past its ttl (stale_if_error=) for the callers in case the next attempt fails.
        self.made: Value | None = None
        self.attempt: Attempt | None = None  # set exactly in running* and refreshing*
        # The error, as raised, and the end of its cooldown: set exactly in failed.
        self.failure: tuple[BaseException, Any, BaseException | None, float] | None = None
        self.retry_at: float | None = None  # only in ready-failing: no refresh before this
        self.until: float | None = None  # the hot path serves ``made`` before this (None: ever)

    def _to(self, state: Phase) -> None:
        self.state, made = state, self.made
        if made is None:
            self.until = None
        elif state not in SERVING:  # a stale value kept for the next attempt: not served
            self.until = -math.inf
        else:
            failing = state in FAILING
            ends = self.store.policy.retires(made.expires_at) if failing else made.expires_at
            if state in REFRESHES:
                self.until = ends
                return
            wants = self._wants(made)
            if wants is not None and failing and self.retry_at is not None:
                wants = max(wants, self.retry_at)
            self.until = ends if wants is None else wants if ends is None else min(wants, ends)

    def _wants(self, made: Value) -> float | None:
        """When a served value wants replacing: due for refresh, or (stale_if_error=) expired."""
        if made.refresh_at is not None or self.store.policy.stale_if_error is None:
            return made.refresh_at
        return made.expires_at

    def _ends(self, made: Value) -> float | None:
        """When ``made`` is retired: at its ttl's end, or that plus stale_if_error."""
        return self.store.policy.retires(made.expires_at)

    def serves(self, now: float) -> bool:
        """Whether calls get the value at once: fresh, or stale after a failed try to replace it."""
        made, state = self.made, self.state
        if made is None or state not in SERVING:
            return False
        expires = made.expires_at
        if expires is None or now < expires:
            return True
        return state in FAILING and now < cast(float, self._ends(made))

    def due(self, now: float) -> Phase:
        """The state that time has brought this record to (the table's time rows)."""
        made, state = self.made, self.state
        if made is not None and made.expires_at is not None and now >= made.expires_at:
            if now >= cast(float, self._ends(made)):
                return RUNNING if self.attempt is not None else IDLE
            if state == REFRESHING:
                return RUNNING_STALE  # calls join the refresh; the value is kept for them
            if state == READY:
                return READY_STALE  # not served; kept for the next attempt's callers
        if state == FAILED and self.failure is not None and now >= self.failure[3]:
            return IDLE
        return state

    def advance(self, now: float) -> None:
        """Apply the time rows: retire an expired value, forget an error whose cooldown ended."""
        state, made = self.due(now), self.made
        # Past its end a value is retired also when the state stays (running: a timed-out run
        # that goes on past the stale window).
        ends = None if made is None else self._ends(made)
        expired = ends is not None and now >= ends
        if state != self.state or expired:
            if expired:
                self._retire()
            self.drop() if state == IDLE else self._to(state)

    def view(self, now: float) -> tuple[State, float | None, float | None]:
        """This record as ``status()`` shows it: its state, when its value was made (wall
        clock), and, for a value kept past its ttl, when it is retired (wall clock)."""
        state, made = self.due(now), self.made
        if made is None:
            return PUBLIC[state], None, None
        stale = None
        expires = made.expires_at  # a failing value may be before its ttl, or have none
        if state in STALE or (state in FAILING and expires is not None and now >= expires):
            stale = made.wall_time + cast(float, self._ends(made)) - made.made_at
        return PUBLIC[state], made.wall_time, stale

    def _retire(self, now: bool = True) -> None:
        made, self.made, self.retry_at = self.made, None, None
        attempt = self.attempt
        if attempt is not None and attempt.fell_back:
            # Its waiters were given ``made`` and the run goes on (a timeout within the
            # window): a call that joins it from now on gets the failure, not a retired value.
            attempt.withdraw()
        if made is not None and made.stack is not None:  # only a cleanup has a keeper to wake
            if now:
                made.retire()
            retired = self.store.retired
            retired.append(made)
            if len(retired) > 64:  # cleaned-up values leave the list, not only at teardown
                self.store.retired = [v for v in retired if v.pending]

    def pin(self, made: Value) -> None:
        """Serve ``made``, a stand-in from a test, as if an attempt had made it."""
        self._retire()
        self.made = made
        self._to(READY)

    def unpin(self, value: object) -> None:
        """Stop serving a pinned ``value``; nothing is cleaned up (it belongs to the test)."""
        if self.made is not None and self.made.value is value:
            self.made = None
            self.drop()

    def drop(self, now: bool = True) -> None:
        """Retire the value and forget the record (reset, eviction, teardown, time).

        With ``now=False`` the value's cleanup waits for the store's owner to start it.
        """
        made = self.made
        if self.attempt is None and (made is None or made.stack is None):
            self.made = self.retry_at = None  # nothing to clean up
        else:
            self._retire(now)
        self.failure = self.attempt = self.until = None
        self.state = IDLE  # what _to(IDLE) does, with no value left
        if self.store.records.get(self.key) is self:
            del self.store.records[self.key]

    def refresh_due(self, now: float) -> bool:
        """Whether a value is due for refresh (and no failed refresh's cooldown is on).

        With stale_if_error=, a value past its ttl is due too: it wants replacing.
        """
        made = self.made
        if made is None:
            return False
        wants = self._wants(made)
        return (
            wants is not None and now >= wants and (self.retry_at is None or now >= self.retry_at)
        )

    def begins(self, now: float) -> bool:
        """The start rule, for calls and probes alike: whether an attempt is to start now.

        None is in flight and no failure's cooldown is on, and the record serves no value
        (idle, or a value kept past its ttl and not served), or it serves one that is due for
        refresh (ready, and no failed refresh's cooldown is on).
        """
        if self.attempt is not None or self.failure is not None:
            return False
        if self.made is not None and self.serves(now):
            return self.state in CAN_REFRESH and self.refresh_due(now)
        return True

    def enter(
        self,
        now: float,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        bind: Callable[[], Resolve] | None,
    ) -> Value | Attempt:
        """A call's rows of the table: return the value to serve or the attempt to wait for.

        An attempt that is needed starts with ``args``, ``kwargs`` and what ``bind`` returns
        (see :meth:`start`).

        Raises:
            Exception: the failure whose cooldown is on.
            OnceClosedError: an attempt is needed and the loop's teardown has begun.
        """
        store = self.store
        begun = self.begins(now)
        if begun:
            self.start(args, kwargs, bind and bind())
        made = self.made
        if made is not None and self.serves(now):  # a refresh just begun serves the value too
            store.hits += 1
            if self.key in store.records:
                store.records.move_to_end(self.key)
            return made
        if self.failure is not None:
            fast_failed(store)
            raise_again(*self.failure[:3])
        joined = not begun
        if joined:
            store.joins += 1
        attempt: Attempt = self.attempt  # type: ignore[assignment]
        if attempt.span is not None:
            waits(attempt, joined)
        return attempt

    def start(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], resolve: Resolve | None
    ) -> Attempt:
        """Start an attempt (idle -> running) or a refresh (ready -> refreshing); return it.

        A record without a value (a miss) takes the lean way: no clock read, no table lookup
        beyond the state itself, and no span or log unless someone watches (see ``watched``).
        """
        store = self.store
        if store.loop_state.closed:
            self.drop()
            raise OnceClosedError(store.name, process=in_process_loop())
        made = self.made
        self.attempt = attempt = Attempt(store.name, self.key, store.new_event())
        attempt.show_key = store.policy.log_keys
        store.tries += 1
        attempt.number = store.tries
        refresh = False
        if made is None:
            self.state, self.until = RUNNING, None  # what _to(RUNNING) says with no value
        else:  # ready(-failing) -> refreshing(-failing), ready-stale -> running-stale
            refresh = self.serves(_clock.monotonic())
            failing, self.retry_at = self.state == READY_FAILING, None  # it applied until now
            self._to((REFRESHING_FAILING if failing else REFRESHING) if refresh else RUNNING_STALE)
        work = store.work(self, attempt, args, kwargs, resolve)
        if logger.isEnabledFor(logging.INFO):
            attempt.logs = True
            logger.info(
                "%s: %s started",
                attempt.label,
                "refresh" if refresh else "attempt",
                extra=fields(
                    store.name, "refresh_start" if refresh else "start", attempt=attempt.number
                ),
            )
        work = traced(attempt, refresh, work)
        # Work that keeps no value ends when it settles: its attempt holds its task until then.
        attempt.task = store.spawn(work, name="fastapi_once: attempt")
        if store.policy.timeout is not None:
            spawn(store.loop, self._watch(attempt), "fastapi_once: timeout")
        return attempt

    async def _watch(self, attempt: Attempt) -> None:
        """Past ``timeout=``: release the waiters with OnceTimeoutError and cancel the run.

        The run may go on (a thread cannot be interrupted): it stays this record's attempt, so
        no second run starts, later calls get the same error at once, and teardown waits for
        it; its outcome is then applied as the timeout (see :meth:`settle`).
        """
        store, policy = self.store, self.store.policy
        with anyio.move_on_after(cast(float, policy.timeout)):
            await attempt.done.wait()
        if attempt.settled:
            return
        attempt.ended = new_event(store.loop)
        error = policy.timed_out(attempt.label)
        self._release(attempt, error, None, _clock.monotonic())
        if self.attempt is attempt:
            store.last_error = (type(error).__name__, str(error), self.key)
            if self.state == REFRESHING:  # a failed refresh, though its run goes on
                self._to(REFRESHING_FAILING)
        if attempt.scope is not None:
            attempt.scope.cancel()

    def fail(self, attempt: Attempt, exc: BaseException, took: float) -> None:
        """The attempt raised ``exc`` after ``took`` seconds: share it (see :meth:`settle`)."""
        error, traceback = exc, exc.__traceback__
        if not isinstance(exc, Exception) and isinstance(exc, anyio.get_cancelled_exc_class()):
            error, traceback = OnceCancelledError(attempt.label), None
            error.__cause__ = exc
        if self.settle(attempt, None, error, traceback, took):
            store = self.store
            refresh = self.made is not None
            stale = refresh and attempt.fell_back  # its waiters got the value kept
            # The type only: exception text can hold secrets (a DSN, a token); DEBUG has it.
            kind = error_type(error)
            logger.warning(
                "%s: %s failed after %.2f s with %s%s",
                attempt.label,
                "refresh" if refresh else "attempt",
                took,
                kind,
                "; serving the stale value (stale_if_error=)"
                if stale
                else "; keeping the current value"
                if refresh
                else "",
                extra=fields(
                    store.name,
                    "refresh_failed" if refresh else "failed",
                    duration_s=took,
                    error_type=kind,
                    attempt=attempt.number,
                ),
            )
            logger.debug(
                "%s: failure",
                attempt.label,
                exc_info=error,
                extra=fields(store.name, "failure_detail", error_type=kind, attempt=attempt.number),
            )

    def settle(
        self,
        attempt: Attempt,
        made: Value | None,
        error: BaseException | None,
        traceback: Any,
        took: float,
    ) -> bool:
        """Deliver an attempt's outcome, ``took`` seconds after it started; apply it here if the
        attempt is still this record's (a value made is then served).

        Returns whether ``made`` (or ``error``) was applied as given. A run that timed out has
        its waiters released already: the timeout is its outcome. A run that a teardown stopped
        waiting for is no longer this record's: its waiters get :class:`OnceClosedError`. In
        both cases ``made`` is given to nobody and its maker must clean it up.
        """
        store, refresh = self.store, self.state in REFRESHES
        store.last_duration = took
        mine, applied = self.attempt is attempt, True
        # An outcome in before this one: only a timeout delivers one while the run goes on.
        timed_out = attempt.error is not None
        if timed_out:  # the timeout is the outcome
            made, error, traceback, applied = None, attempt.error, attempt.traceback, False
        elif not mine and error is None:
            closed = OnceClosedError(store.name, process=in_process_loop())
            made, error, traceback, applied = None, closed, None, False
        if not timed_out:
            if error is not None:
                self._release(attempt, error, traceback, _clock.monotonic())
            else:
                attempt.value = made.value  # type: ignore[union-attr]
                attempt.done.set()
        if mine:
            kept = self.made
            # The clock only where the outcome depends on it: a success on no value needs none.
            now = 0.0 if kept is None and error is None else _clock.monotonic()
            store.last_error = (
                None if error is None else (type(error).__name__, str(error), self.key)
            )
            if kept is not None:
                self.advance(now)  # the ttl may have ended while the run went on
            self.attempt = None
            if error is None:
                if self.key in store.records:
                    store.records.move_to_end(self.key)  # the newest value is the last to go
                if self.made is not None:
                    self._retire()
                self.made, self.retry_at = made, None
                if made.expires_at is None and made.refresh_at is None:  # type: ignore[union-attr]
                    self.state, self.until = READY, None  # what _to(READY) says of a timeless value
                else:
                    self._to(READY)
                store.evict(keep=self)
            elif self.made is not None:  # a failed refresh, or a stale value served instead
                self.retry_at = store.policy.cooldown_until(now, error)
                self._to(READY_FAILING)
                store.evict(keep=self)
            elif (until := store.policy.cooldown_until(now, error)) is None:
                self.drop()
            else:
                self.failure = (error, traceback, error.__context__, until)
                self._to(FAILED)
                store.evict(keep=self)
        if attempt.watched:
            ended(store, attempt, took, refresh)
        if mine and applied and error is None and attempt.logs:
            logger.info(
                "%s: %s in %.2f s",
                attempt.label,
                "refreshed" if refresh else "ready",
                took,
                extra=fields(
                    store.name,
                    "refreshed" if refresh else "ready",
                    duration_s=took,
                    attempt=attempt.number,
                ),
            )
        return mine and applied

    def _release(self, attempt: Attempt, error: BaseException, traceback: Any, now: float) -> None:
        """Wake ``attempt``'s waiters with ``error``, or with the stale value kept for them.

        A value is kept for them past its ttl, until ttl + stale_if_error (see the table).
        """
        made = self.made
        if (
            made is not None
            and made.expires_at is not None
            and self.attempt is attempt
            and self.store.policy.stale_if_error is not None
            and made.expires_at <= now < cast(float, self._ends(made))
        ):
            attempt.fall_back(made.value, error, traceback)
        else:
            attempt.fail(error, traceback)

    async def keep(self, made: Value, attempt: Attempt) -> None:
        """Park the making task on ``made`` until it is retired; its cleanup then runs here.

        Not before every call that waited on ``attempt`` has the value, though: retired at
        once (evicted by a concurrent key), it must not be closed under its first callers.
        """

        async def handed_out() -> None:
            if attempt.waiters:
                attempt.picked = new_event(self.store.loop)
                await attempt.picked.wait()

        def due() -> float | None:
            now, ends = _clock.monotonic(), self._ends(made)
            if self.made is made and ends is not None and now >= ends:
                self.advance(now)
            if self.made is not made:
                made.retire()
                return None
            return None if ends is None else ends - now

        def abandoned() -> None:
            self.store.loop_state.report_left_to_loop_end(self.store.name)

        await made.keep(due, abandoned, handed_out)


class Store:
    """What one once keeps in one event loop. Only that loop's thread touches it."""

    __slots__ = (
        "__weakref__", "_loop", "evictions", "hits", "hot_loop", "joins", "keeps", "last_duration",
        "last_error", "loop_state", "maxsize", "name", "new_event", "on_forget", "policy",
        "records", "retired", "spawn", "tries", "work",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        policy: Policy,
        maxsize: int,
        work: Work,
        on_forget: Callable[..., None],
        loop: object,
        loop_state: LoopState,
        keeps: bool = True,
    ) -> None:
        self.name, self.policy, self.maxsize = name, policy, maxsize
        self.work = work  # runs an attempt in a library task: makes, settles, keeps the value
        self.keeps = keeps  # whether that task may park keeping a value with a cleanup
        self.on_forget = on_forget  # the once forgets its hot cell (this store's, if given)
        # The loop is held weakly, so that a closed loop and all it kept can be collected: the
        # loop states are weakly keyed by their loops, and a store reachable from its loop's
        # state must not keep that loop alive (nothing it holds does, see _events).
        me = weakref.ref(self)

        def loop_gone(_: object) -> None:  # the once's hot cell lets go of this store too
            store = me()
            if store is not None:
                on_forget(store)

        self._loop = weakref.ref(loop, loop_gone)
        # For the once's hot cell: ``hot_loop()._thread_id == get_ident()`` proves the loop runs.
        self.hot_loop: Callable[[], Any] = self._loop if proves_thread(loop) else unproven
        self.loop_state = loop_state
        self.new_event = event_factory(loop)  # its library's own event class
        self.spawn = spawner(loop, keeps)  # starts an attempt's task (tracked if it keeps)
        self.records: OrderedDict[Hashable, Record] = OrderedDict()  # least recent first
        self.retired: list[Value] = []  # retired values with a cleanup, until it has run
        self.hits = self.joins = self.tries = self.evictions = 0
        self.last_duration: float | None = None
        # Type name, message (no frames) and key of the last attempt's error.
        self.last_error: tuple[str, str, Hashable] | None = None
        register(self)  # a metric source while it lives

    def census(self) -> tuple[int, list[State]]:
        """How many values it holds, and each record's state now (see the metrics).

        Read from a metric reader's thread: the records are copied first (a change meanwhile
        raises RuntimeError, and the reader tries again at its next collection).
        """
        records = list(self.records.values())
        now = _clock.monotonic()
        return sum(1 for r in records if r.made), [PUBLIC[r.due(now)] for r in records]

    @property
    def loop(self) -> object:
        """The store's event loop (alive while anything runs in it)."""
        return self._loop()

    def record(self, key: Hashable, now: float) -> Record:
        """The record of ``key`` as of ``now`` (time rows applied), created idle if absent."""
        rec = self.records.get(key)
        if rec is not None:
            rec.advance(now)  # may drop it
        if rec is None or rec.state == IDLE:
            rec = self.records[key] = Record(self, key)
        return rec

    def evict(self, keep: Record) -> None:
        """Drop least recently used records down to ``maxsize``, never ``keep`` or one in flight.

        Records in flight hold no new value yet, so the store may exceed ``maxsize`` by them.
        """
        over = len(self.records) - self.maxsize
        if over <= 0:
            return
        victims: list[Record] = []
        for rec in self.records.values():  # least recent first: usually the first few
            if rec.attempt is None and rec is not keep:
                victims.append(rec)
                if len(victims) == over:
                    break
        records = self.records
        for rec in victims:
            made = rec.made
            if made is None or made.stack is None:  # no cleanup, no attempt: forget it at once
                del records[rec.key]
                rec.state = IDLE
            else:
                rec.drop()
        self.evictions += len(victims)

    def busy(self) -> list[Attempt]:
        return [r.attempt for r in self.records.values() if r.attempt is not None]

    def retire_all(self) -> None:
        for rec in list(self.records.values()):
            rec.drop(now=False)
        self.last_error = None

    def cleanups(self) -> list[Value]:
        self.retired = [v for v in self.retired if v.pending]
        return list(self.retired)

    def forget(self) -> list[Value]:
        kept = [r.made for r in self.records.values() if r.made is not None]
        self.records.clear()
        self.on_forget()
        return [v for v in [*self.retired, *kept] if v.pending]


class KeyView:
    """A store seen through some of its keys, for a per-key reset."""

    def __init__(self, store: Store, key: Hashable) -> None:
        self.store, self.key = store, key

    def _records(self) -> list[Record]:
        rec = self.store.records.get(self.key)
        return [] if rec is None else [rec]

    def busy(self) -> list[Attempt]:
        return [r.attempt for r in self._records() if r.attempt is not None]

    def retire_all(self) -> None:
        for rec in self._records():
            rec.drop(now=False)
        last = self.store.last_error
        if last is not None and last[2] == self.key:  # reset forgets its key's error
            self.store.last_error = None

    def cleanups(self) -> list[Value]:
        return self.store.cleanups()

    def forget(self) -> list[Value]:  # pragma: no cover - teardown forgets whole stores
        return []
