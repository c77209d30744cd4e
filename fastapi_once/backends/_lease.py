"""The cross-process algorithm, written once over the store protocol (``_store.LeaseStore``).

One call of :meth:`StoreBackend.share` walks these states (``claim`` is one atomic store call):

=============  ===============================  ============================================
state          event                            next state, side effect
=============  ===============================  ============================================
claiming       Served(value)                    done: return the value
claiming       Cooling(left)                    done: raise OnceCoolingDownError
claiming       Lease                            leading
claiming       Held, first time                 claiming, watching the record from now on
claiming       Held                             waiting
claiming       store unavailable, ``local``     done: make the value here (fallback)
claiming       store unavailable, ``raise``     waiting out the outage (backoff), or raise
                                                BackendError if the store was never reached
claiming       store unavailable, ``fail``      done: raise BackendError (``local``, but the
                                                once keeps a value its failure leaves served)
waiting        the record changed / recheck     claiming
waiting        wait_timeout passed              done: raise WaitTimeoutError
leading        work returns, recorded           done: complete, return the value
leading        work raises                      done: abandon with the cooldown, re-raise
leading        lease lost (renewal failed)      ``raise``: done: work cancelled, abandon,
                                                LeaseLostError; ``local``, ``fail``: the work
                                                goes on (this process would make it anyway)
leading        cancelled                        done: abandon (shielded), re-raise
leading        complete: store unavailable      ``local``, ``fail``: return the value made,
                                                unrecorded; ``raise``: BackendError
leading        complete: the lease was gone     ``local``, ``fail``: return the value made,
                                                unrecorded; ``raise``: LeaseLostError
=============  ===============================  ============================================

Every store call is bounded by ``wait_timeout``: a store that does not answer is unavailable.
A reset (``clear``) reaches every process's listener, which calls the core's ``forget``
callback (not in the loop that reset: it forgot already).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypedDict, TypeVar

import anyio
import anyio.lowlevel

from .._errors import LeaseLostError, OnceCoolingDownError, WaitTimeoutError
from .._logs import error_type, fields
from ._base import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_WAIT_TIMEOUT,
    Backend,
    backoff,
    holder_id,
    seconds,
    whole,
)
from ._codec import encode_json
from ._store import (
    UNKEYED,
    Cooling,
    Lease,
    LeaseStore,
    Reset,
    Served,
    StoreUnavailableError,
    Watch,
)

logger = logging.getLogger("fastapi_once")

T = TypeVar("T")

#: What a once does when its store cannot be reached (``once(on_backend_error=)``); the
#: algorithm also takes ``"fail"``: raise at once, without riding out the outage (a kept value
#: is then served instead, see ``share``).
OnBackendError = Literal["local", "raise"]
OnError = Literal["local", "raise", "fail"]

#: The core's callback that forgets, in the running loop, what another process reset:
#: ``forget(name, key digest or None for every value of name)``. It does not block.
Forget = Callable[[str, str | None], None]

# The fencing token of the lease under which the work of this context runs; None outside one.
_fencing_token: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fastapi_once_fencing_token", default=None
)


def fencing_token() -> int | None:
    """Return the fencing token of the lock under which the current work runs, or None.

    Pass it with each write the work makes to a store that can compare it (e.g.
    ``UPDATE ... SET fence = :token WHERE fence < :token``), so that writes from a paused,
    superseded leader are refused. Each leader's token is greater than every earlier one's;
    :class:`~fastapi_once.backends.FileLockBackend` gives None (its lock ends with its process).
    The guarantees per backend: the "Fencing" table of ``docs/across.md``.
    """
    return _fencing_token.get()


class StoreOptions(TypedDict, total=False):
    """The options every store hands to :class:`StoreBackend` (see there), ``lease`` aside."""

    wait_timeout: float | None
    ttl: float | None
    recheck_interval: float
    max_value_bytes: int | None


class LeaseOptions(StoreOptions, total=False):
    """:class:`StoreOptions` and ``lease``, for a store whose caller chooses it."""

    lease: float


class StoreBackend(Backend, LeaseStore):
    """A backend made of a store's primitives: the lease algorithm over :class:`LeaseStore`.

    A store subclasses this, calls ``super().__init__(...)`` and implements the
    :class:`LeaseStore` methods; the :class:`Backend` API comes from here.

    Args:
        wait_timeout: the longest a follower waits and a store call takes (None: no bound).
        ttl: the default life of an unkeyed once's value in seconds (None: until reset).
        lease: seconds a lease lives unrenewed (renewed every third of it while work runs).
        recheck_interval: how often a waiting follower claims again without being woken.
        max_value_bytes: the largest value recorded, in bytes of JSON (None: no limit).

    Raises:
        ValueError: a time is not a positive number, or ``max_value_bytes`` not a positive int.
    """

    def __init__(
        self,
        *,
        wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        ttl: float | None = None,
        lease: float = 10.0,
        recheck_interval: float = 1.0,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self.wait_timeout = seconds("wait_timeout", wait_timeout)
        self.ttl = seconds("ttl", ttl)
        self.lease: float = seconds("lease", lease)
        self.recheck_interval: float = seconds("recheck_interval", recheck_interval)
        if max_value_bytes is not None:
            owner, unit = type(self).__name__, " (bytes), or None for no limit"
            whole(owner, "max_value_bytes", max_value_bytes, least=1, unit=unit)
        self.max_value_bytes = max_value_bytes
        self._me = secrets.token_hex(8)  # tells this backend's own resets apart, per loop
        self._outages: set[str] = set()  # names of onces falling back now (one warning each)
        self.bind(self._hear)

    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        """See :meth:`Backend.run_once` and :meth:`share`; ``ttl`` defaults to the backend's."""
        ttl = self.ttl if ttl is None else seconds("ttl", ttl)
        return await self.share(name, UNKEYED, work, ttl=ttl)

    async def run_keyed(
        self,
        name: str,
        key: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        cooldown: float | None = None,
        refresh: float | None = None,
    ) -> Any:
        """See :meth:`Backend.run_keyed` and :meth:`share`."""
        return await self.share(
            name, key, work, ttl=seconds("ttl", ttl), cooldown=cooldown, refresh=refresh
        )

    async def reset(self, name: str) -> None:
        """Clear ``name``'s record; every live process forgets its value within 1 s."""
        await self.reset_keyed(name, UNKEYED)

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Clear ``name``'s record for ``key`` (every key's if None); every live process
        forgets its value(s) within 1 s.

        Raises:
            BackendError: the store failed or could not be reached (within ``wait_timeout``).
        """
        await self._bounded(self.clear(name, key, origin=self._origin()))

    async def share(
        self,
        name: str,
        key: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None,
        cooldown: float | None = None,
        refresh: float | None = None,
        on_error: OnError = "raise",
        fell_back: Callable[[], None] | None = None,
    ) -> Any:
        """Return the record's value (as JSON decodes it), running ``work`` (which returns JSON
        data) here if this process leads or falls back: see the module's state table.

        ``key`` is a digest or :data:`UNKEYED`; the value lives ``ttl`` seconds (None: until
        reset), a failure is recorded for ``cooldown`` seconds, and a value older than
        ``refresh`` is made again by one process. ``fell_back()`` is called at each fallback.

        Raises:
            OnceCoolingDownError: another process's run failed within ``cooldown``.
            WaitTimeoutError: another process held the lease longer than ``wait_timeout``.
            LeaseLostError: the lease was lost while ``work`` ran (nothing is recorded).
            BackendError: the store failed (or, under ``"raise"``, could not be reached).
            TypeError: the value is not JSON-serialisable. ValueError: it is too large.
            Exception: what ``work`` raised, in the process that ran it.
        """
        shown = name if key == UNKEYED else f"{name}[#{key[:8]}]"  # as logs name the key
        started = anyio.current_time()
        deadline = started + (self.wait_timeout or math.inf)
        holder, failures, reached = holder_id(), 0, False
        watching = contextlib.AsyncExitStack()  # the watch, entered at the first Held
        watch: Watch | None = None
        try:
            while True:
                try:
                    claim = await self._bounded(
                        self.claim(name, key, lease=self.lease, refresh=refresh, holder=holder),
                        deadline,
                    )
                except StoreUnavailableError as exc:
                    if on_error == "local":
                        self._fell_back(name, exc, fell_back)
                        return json.loads(encode_json(name, await work(), self.describe()))
                    left = deadline - anyio.current_time()
                    if not reached or left <= 0 or on_error == "fail":
                        raise
                    await anyio.sleep(min(backoff(failures), left))  # ride out the outage
                    failures += 1
                    continue
                self._answered(name)
                reached, failures = True, 0
                if isinstance(claim, Served):
                    return json.loads(claim.value)
                if isinstance(claim, Cooling):
                    raise OnceCoolingDownError(shown, claim.seconds_left)
                if isinstance(claim, Lease):
                    return await self._lead(claim, shown, work, ttl, cooldown, on_error, fell_back)
                now = anyio.current_time()
                if now >= deadline:
                    raise WaitTimeoutError(shown, self.describe(), now - started, claim.holder)
                if watch is None:  # watch from now on, then claim again: no change is lost
                    watch = await watching.enter_async_context(self.watch(name, key))
                    continue
                await watch.changed(min(self.recheck_interval, deadline - now))
        finally:
            with anyio.CancelScope(shield=True):
                await watching.aclose()

    async def _lead(
        self,
        lease: Lease,
        shown: str,
        work: Callable[[], Awaitable[Any]],
        ttl: float | None,
        cooldown: float | None,
        on_error: OnError,
        fell_back: Callable[[], None] | None,
    ) -> Any:
        """Run ``work`` under ``lease`` (renewed, fenced), then complete or abandon it."""
        try:
            value = await self._guarded(lease, shown, work, give_up=on_error == "raise")
            text = encode_json(shown, value, self.describe())
            size = len(text.encode())
            if self.max_value_bytes is not None and size > self.max_value_bytes:
                raise ValueError(
                    f"{shown}'s result is {size} bytes of JSON, over the limit of "
                    f"{self.max_value_bytes} bytes of {self.describe()} (max_value_bytes=); it "
                    "was not recorded. Return a smaller value, or raise max_value_bytes="
                )
        except BaseException as exc:  # a failure cools down; a lost lease, a cancellation not
            failed = isinstance(exc, Exception) and not isinstance(exc, LeaseLostError)
            await self._abandon(lease, cooldown if failed else None)
            raise
        try:
            done = await self._bounded(self.complete(lease, text, ttl=ttl))
        except BaseException as exc:
            await self._abandon(lease, None)
            if on_error == "raise" or not isinstance(exc, StoreUnavailableError):
                raise
            self._fell_back(lease.name, exc, fell_back)  # the value is made: serve it, unrecorded
        else:
            if not done and on_error == "raise":  # else served unrecorded, as a fallback would
                raise LeaseLostError(shown, self.describe(), "the lease expired or another took it")
        return json.loads(text)

    async def _guarded(
        self, lease: Lease, shown: str, work: Callable[[], Awaitable[Any]], *, give_up: bool
    ) -> Any:
        """Run ``work`` with the lease's fencing token set, renewing the lease every third of
        its life; with ``give_up``, a lost lease (a renewal refused, or none answered for a
        whole lease) cancels the work: LeaseLostError (see the state table)."""
        lost: str | None = None
        work_scope = anyio.CancelScope()

        async def renew() -> None:
            nonlocal lost
            every, renewed = self.lease / 3, anyio.current_time()
            while lost is None:
                await anyio.sleep(every)
                sent = anyio.current_time()
                try:
                    held = await self._bounded(self.renew(lease, seconds=self.lease), sent + every)
                except StoreUnavailableError:
                    if give_up and anyio.current_time() - renewed >= self.lease:
                        lost = "the store could not be reached for a whole lease"
                    continue
                if not held and give_up:
                    lost = "the lease expired or another process took it"
                renewed = sent
            work_scope.cancel()

        result: Any = None
        error: BaseException | None = None
        token = _fencing_token.set(lease.fence)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(renew)
                try:
                    # The work runs in this task, not in the task group, so that its exception
                    # reaches the caller unchanged rather than inside an exception group.
                    with work_scope:
                        result = await work()
                except BaseException as exc:
                    error = exc
                tg.cancel_scope.cancel()
        finally:
            _fencing_token.reset(token)
        if lost is not None:
            raise LeaseLostError(shown, self.describe(), lost) from error
        if error is not None:
            raise error
        return result

    async def _abandon(self, lease: Lease, cooldown: float | None) -> None:
        """Free ``lease`` (recording ``cooldown``), shielded and bounded; if the store cannot
        be told, the lease ends by itself."""
        with anyio.CancelScope(shield=True), contextlib.suppress(StoreUnavailableError):
            await self._bounded(self.abandon(lease, cooldown=cooldown))

    async def _bounded(self, call: Awaitable[T], deadline: float = math.inf) -> T:
        """Await one store call for at most ``wait_timeout`` (and not past ``deadline``, but
        at least a little): a store that does not answer is unavailable."""
        now = anyio.current_time()
        longest = max(min(self.wait_timeout or math.inf, deadline - now), 0.05)
        with anyio.move_on_after(longest):
            return await call
        raise StoreUnavailableError(f"{self.describe()}: no answer within {longest:.1f} s")

    def _fell_back(
        self, name: str, exc: BaseException, fell_back: Callable[[], None] | None
    ) -> None:
        """Warn at the first fallback of ``name`` in an outage; count each one."""
        if name not in self._outages:
            self._outages.add(name)
            kind = error_type(exc)
            logger.warning(
                "%s: %s cannot be reached (%s); making values in this process until it answers",
                name,
                self.describe(),
                kind,
                extra=fields(name, "backend_fallback", error_type=kind),
            )
        if fell_back is not None:
            fell_back()

    def _answered(self, name: str) -> None:
        if name in self._outages:
            self._outages.discard(name)
            logger.info(
                "%s: %s answers again; values are shared across processes again",
                name,
                self.describe(),
                extra=fields(name, "backend_recovered"),
            )

    def _origin(self) -> str:
        """This backend in the running event loop: who a reset came from."""
        return f"{self._me}/{id(anyio.lowlevel.current_token().native_token)}"

    def _hear(self, reset: Reset) -> None:
        """A reset heard by the store's listener: forget it here, unless this loop sent it."""
        if reset.origin != self._origin() and self._forget is not None:
            self._forget(reset.name, None if reset.key == UNKEYED else reset.key)
