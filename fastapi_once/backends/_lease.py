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
leading        lease lost (renewal failed)      done: work cancelled, abandon, LeaseLostError
leading        cancelled                        done: abandon (shielded), re-raise
leading        complete: store unavailable      ``local``, ``fail``: return the value made,
                                                unrecorded;
                                                ``raise``: BackendError
=============  ===============================  ============================================

Every store call is bounded by ``wait_timeout``: a store that does not answer is unavailable.
A reset (``clear``) is announced by the store to every process's listener, which calls the
``forget`` callback the core handed over (not in the loop that reset: it forgot already).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel

from .._errors import LeaseLostError, OnceCoolingDownError, WaitTimeoutError
from .._logs import error_type, fields
from ._base import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_WAIT_TIMEOUT,
    Backend,
    backoff,
    check_size,
    holder_id,
    max_bytes,
    run_guarded,
    seconds,
)
from ._codec import encode_json
from ._store import (
    UNKEYED,
    Cooling,
    Held,
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


class StoreBackend(Backend, LeaseStore):
    """A backend made of a store's primitives: the lease algorithm over :class:`LeaseStore`.

    A store subclasses this, calls ``super().__init__(...)`` with the options below, and
    implements the :class:`LeaseStore` methods; ``run_once``, ``run_keyed``, ``reset`` and
    ``reset_keyed`` (the :class:`Backend` API) come from here.

    Args:
        wait_timeout: the longest a follower waits, and any one store call takes, in seconds
            (default 300); None: no bound.
        ttl: the default life of an unkeyed once's value in seconds; None keeps it until reset.
        lease: seconds a lease lives without renewal (renewed every third of it while the
            work runs): how long a dead leader blocks the others where the store's lock does
            not end with its holder.
        recheck_interval: how often a waiting follower claims again without being woken.
        max_value_bytes: the largest value recorded, in bytes of JSON; None: no limit.

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
        self.max_value_bytes = max_bytes(max_value_bytes)
        self._me = secrets.token_hex(8)  # tells this backend's own resets apart, per loop
        self._forget: Forget | None = None  # set by the core at bind time
        self._outages: set[str] = set()  # names of onces falling back now (one warning each)
        self.bind(self._hear)

    # --- the Backend API ----------------------------------------------------------------------

    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        """Return ``name``'s recorded value, running ``work`` first if no process has (see
        :meth:`share`); ``ttl`` defaults to the backend's."""
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
        """As :meth:`run_once`, for one key (a digest) of a keyed once (see :meth:`share`)."""
        return await self.share(
            name, key, work, ttl=seconds("ttl", ttl), cooldown=cooldown, refresh=refresh
        )

    async def reset(self, name: str) -> None:
        """Clear ``name``'s record; every live process forgets its value within 1 s."""
        await self.forget_everywhere(name, UNKEYED)

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Clear ``name``'s record for ``key`` (a digest; every key's if None); every live
        process forgets its value(s) within 1 s."""
        await self.forget_everywhere(name, key)

    def attach(self, forget: Forget) -> None:
        """Hand over the core's callback for resets heard from other processes (at bind)."""
        self._forget = forget

    # --- the algorithm ------------------------------------------------------------------------

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
        """Return the record's value (as JSON decodes it), running ``work`` here if this
        process leads; see the module's state table.

        Args:
            name: the once's name.
            key: the key's digest, or :data:`UNKEYED`.
            work: makes the value (JSON data) if this process leads, or falls back.
            ttl: seconds the value lives; None: until reset.
            cooldown: seconds a failure is recorded for, or None.
            refresh: age in seconds after which one process makes the value again.
            on_error: ``"local"``: when the store cannot be reached, run ``work`` here (one
                WARNING per once per outage, and ``fell_back()`` each time); ``"raise"``:
                BackendError (followers first ride out an outage of a store they reached);
                ``"fail"``: BackendError at once (the caller keeps a value to serve instead).
            fell_back: called at each fallback (the core counts them).

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
        deadline = math.inf if self.wait_timeout is None else started + self.wait_timeout
        holder, failures, reached = holder_id(), 0, False
        watching: Any = None  # the watch's context manager, once the first Held was seen
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
                        return await self._fall_back(name, work, exc, fell_back)
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
                assert isinstance(claim, Held)
                now = anyio.current_time()
                if now >= deadline:
                    raise WaitTimeoutError(shown, self.describe(), now - started, claim.holder)
                if watch is None:  # watch from now on, then claim again: no change is lost
                    entering = self.watch(name, key)
                    watch = await entering.__aenter__()
                    watching = entering  # entered: left in the finally below
                    continue
                await watch.changed(min(self.recheck_interval, deadline - now))
        finally:
            if watching is not None:
                with anyio.CancelScope(shield=True):
                    await watching.__aexit__(None, None, None)

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
            value = await run_guarded(
                shown, self.describe(), lease.fence, work, lambda: self._until_lost(lease)
            )
            text = encode_json(shown, value, self.describe())
            check_size(shown, text, self.max_value_bytes, self.describe())
        except LeaseLostError:
            await self._abandon(lease, None)
            raise
        except Exception:
            await self._abandon(lease, cooldown)  # the work failed
            raise
        except BaseException:
            await self._abandon(lease, None)  # cancelled: no cooldown, the next caller leads
            raise
        try:
            done = await self._bounded(self.complete(lease, text, ttl=ttl), math.inf)
        except StoreUnavailableError as exc:
            await self._abandon(lease, None)
            if on_error != "raise":  # the value is made: serve it, unrecorded
                self._warn(lease.name, exc)
                if fell_back is not None:
                    fell_back()
                return json.loads(text)
            raise
        except BaseException:
            await self._abandon(lease, None)
            raise
        if not done:
            raise LeaseLostError(shown, self.describe(), "the lease expired or another took it")
        return json.loads(text)

    async def _until_lost(self, lease: Lease) -> str:
        """Renew ``lease`` every third of its life until cancelled; return why it was lost."""
        every = self.lease / 3
        renewed = anyio.current_time()
        while True:
            await anyio.sleep(every)
            sent = anyio.current_time()
            try:
                with anyio.fail_after(every):
                    held = await self.renew(lease, seconds=self.lease)
            except (StoreUnavailableError, TimeoutError):
                if anyio.current_time() - renewed >= self.lease:
                    return "the store could not be reached for a whole lease"
                continue
            if not held:
                return "the lease expired or another process took it"
            renewed = sent

    async def _abandon(self, lease: Lease, cooldown: float | None) -> None:
        """Free ``lease`` (recording ``cooldown``), shielded; if the store cannot be told, the
        lease ends by itself."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self._bound()),
            contextlib.suppress(StoreUnavailableError),
        ):
            await self.abandon(lease, cooldown=cooldown)

    async def forget_everywhere(self, name: str, key: str | None) -> None:
        """Clear ``name``'s record for ``key`` (every key's if None) and tell every process.

        Raises:
            BackendError: the store failed or could not be reached (within ``wait_timeout``).
        """
        await self._bounded(self.clear(name, key, origin=self._origin()), math.inf)

    # --- helpers ------------------------------------------------------------------------------

    def _bound(self) -> float:
        return math.inf if self.wait_timeout is None else self.wait_timeout

    async def _bounded(self, call: Awaitable[T], deadline: float) -> T:
        """Await one store call for at most ``wait_timeout`` (and not past ``deadline``, but
        at least a little): a store that does not answer is unavailable."""
        longest = max(min(self._bound(), deadline - anyio.current_time()), 0.05)
        with anyio.move_on_after(longest) as scope:
            return await call
        assert scope.cancelled_caught
        raise StoreUnavailableError(f"{self.describe()}: no answer within {longest:.1f} s")

    async def _fall_back(
        self,
        name: str,
        work: Callable[[], Awaitable[Any]],
        exc: StoreUnavailableError,
        fell_back: Callable[[], None] | None,
    ) -> Any:
        """Make the value in this process: the store cannot be reached (``"local"``)."""
        self._warn(name, exc)
        if fell_back is not None:
            fell_back()
        return json.loads(encode_json(name, await work(), self.describe()))

    def _warn(self, name: str, exc: BaseException) -> None:
        if name in self._outages:
            return
        self._outages.add(name)
        kind = error_type(exc)
        logger.warning(
            "%s: %s cannot be reached (%s); making values in this process until it answers",
            name,
            self.describe(),
            kind,
            extra=fields(name, "backend_fallback", error_type=kind),
        )

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
        if reset.origin == self._origin() or self._forget is None:
            return
        self._forget(reset.name, None if reset.key == UNKEYED else reset.key)
