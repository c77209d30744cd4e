"""The store protocol: the few primitives a cross-process backend implements with its own means.

The cross-process algorithm (``_lease``) is written once over :class:`LeaseStore`; a backend is a
store (its primitives) and nothing more. A record is named by the once's name and a key: the
key's canonical digest (``fastapi_once._keys.shared_key_digest``, 40 hex digits) for a keyed
once, :data:`UNKEYED` for an unkeyed one (an unkeyed once is a keyed once with one key). A
record holds a value (JSON text, as ``_codec`` made it), when it was made, when it expires, a
failure's cooldown, and the lease of the process making it.

How each store makes the primitives (store x primitive: lock, record, wake-up, fencing):

memory (tests: ``tests/backends/memory_store.py``)
    lock: a dict entry with a deadline. record: a dict entry. wake-up: an event per watch;
    resets call the bound callbacks. fencing: a counter per record.
file (the processes of one host)
    lock: ``flock`` on a lock file (one per unkeyed once; 256 stripes per keyed once, so the
    files do not grow with the keys). record: a marker file per record, replaced atomically;
    leaders prune expired ones. wake-up: a waiter polls the lock (``LOCK_SH|LOCK_NB``); resets
    go to an append-only log that each loop's listener polls (never the hot path). fencing:
    None: the lock ends with its process, so no second leader starts while the first runs.
Redis
    lock: ``SET NX PX`` and Lua scripts that renew, complete and abandon only the holder's
    lease. record: a key per record (value and its ``made`` stamp) and a cooldown key.
    wake-up: ``PUBLISH`` on the record's channel, one ``PSUBSCRIBE`` connection per loop;
    resets on a channel of their own. fencing: the server's clock in microseconds floored by
    an ``INCR`` counter: grows across restarts.
PostgreSQL
    lock: an advisory lock (session or transaction) on the leader's own connection. record:
    one row per record in one table. wake-up: ``NOTIFY`` on one channel (the payload names the
    record), one ``LISTEN`` connection per loop; resets on a channel of their own. fencing: a
    sequence: grows across restarts and crashes.
MySQL/MariaDB (planned)
    lock: ``GET_LOCK`` on the leader's own connection. record: one row per record. wake-up:
    the listener polls a generation row. fencing: a counter row.

Writing a store: the public backend class subclasses ``_lease.StoreBackend`` (a
:class:`~fastapi_once.backends.Backend` and a :class:`LeaseStore`, whose ``run_once``,
``run_keyed``, ``reset`` and ``reset_keyed`` are the algorithm), calls
``super().__init__(wait_timeout=..., ttl=..., lease=..., recheck_interval=...,
max_value_bytes=...)`` and implements every abstract method below with its own primitives: the
store keeps no policy (no retries, no wait_timeout, no backoff, no JSON encoding). Its listener
calls ``self.heard(Reset(...))`` for each reset it hears. ``tests/backends/store_contract.py``
is the suite it must pass against the real server (subclass ``StoreContract``, give it a
``kit`` fixture); ``tests/backends/memory_store.py`` is a complete store to read first.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .._errors import BackendError

#: The key of an unkeyed once's one record (a digest is 40 hex digits: never this).
UNKEYED = "-"


class StoreUnavailableError(BackendError):
    """The store cannot be reached: refused or broken connection, no answer in its own timeout.

    The one exception a store raises for an outage (the algorithm then applies the once's
    ``on_backend_error=``). Any other failure of the server (a refused command, a missing
    permission) is a plain :class:`~fastapi_once.backends.BackendError`. The message names the
    store (``describe()``) and never holds a credential.
    """


@dataclass(frozen=True)
class Served:
    """The claim found a value to serve (fresh, or due for refresh while another refreshes it)."""

    value: str  #: the value's JSON text


@dataclass(frozen=True)
class Cooling:
    """The claim found no value, and a failure's cooldown that lasts ``seconds_left`` more."""

    seconds_left: float


@dataclass(frozen=True)
class Held:
    """The claim found no value to serve, and another lease on the record: wait for a change."""

    holder: str | None  #: who holds it (``"pid 1234 on web-1"``), or None if unknown


@dataclass
class Lease:
    """The claim took the record's lease: the caller leads, makes the value, then completes.

    ``handle`` is the store's own (a lock token, an open file, a connection): the algorithm
    hands the lease back to :meth:`LeaseStore.renew`, ``complete`` or ``abandon`` unchanged.
    """

    name: str
    key: str
    fence: int | None  #: the fencing token, or None where the store has none (see the table)
    handle: Any = field(default=None, repr=False)


#: What :meth:`LeaseStore.claim` returns.
Claim: TypeAlias = Served | Cooling | Lease | Held


@dataclass(frozen=True)
class Reset:
    """A record reset in some process: every live process forgets its value(s) for it."""

    name: str
    key: str | None  #: the key reset, :data:`UNKEYED`, or None for every key of ``name``
    origin: str  #: who reset it, as given to :meth:`LeaseStore.clear` (opaque to the store)


class Watch(abc.ABC):
    """A registration for changes of one record, made before the claim it follows."""

    @abc.abstractmethod
    async def changed(self, timeout: float) -> None:
        """Return when the record may have changed, or after ``timeout`` seconds.

        Must return (soon) after any ``complete``, ``abandon`` or ``clear`` of the record, in any
        process, that happened after the watch was entered or after the previous call returned
        (whichever is later): a change between a claim and this call is not lost. May return
        early without a change (the caller claims again); after a lost connection a store wakes
        every watch, since changes may have been missed. Must not hold a connection of its own
        while it waits. Raises nothing but cancellation.
        """


#: What a store calls for each reset it hears (see :meth:`LeaseStore.bind`).
Heard: TypeAlias = Callable[[Reset], None]


class LeaseStore(abc.ABC):
    """The primitives of one cross-process store; the algorithm in ``_lease`` does the rest.

    Every method may be cancelled at any await (the algorithm bounds each call by the once's
    ``wait_timeout``): a cancelled call leaves the store as if it had run whole or not at all,
    and a lease a cancelled ``claim`` took ends within its ``lease`` seconds at the latest
    (better: the store frees it at once). Methods raise :class:`StoreUnavailableError` when the
    server cannot be reached, :class:`~fastapi_once.backends.BackendError` for any other failure
    of the server, and nothing else (no driver exception leaks). A store keeps at most one
    listener (and its connection) per event loop, and bounds the connections it holds; the end
    of an event loop ends them, ``aclose()`` or not, without waiting without bound.
    """

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for errors, logs and status; never includes a credential."""

    #: The callback for resets heard (see :meth:`bind`); until bound, resets are dropped.
    heard: Heard = staticmethod(lambda reset: None)

    def bind(self, heard: Heard) -> None:
        """Hand the store the callback it calls for every reset it hears (see :meth:`clear`).

        Called by the algorithm before the store's first use (again, with the same callback,
        when more onces use the store). From then on the store's listener in each event loop
        that claimed or watched a record (started by the first such call in that loop, running
        until :meth:`aclose` or the loop's end) calls ``self.heard`` on that loop for every
        :class:`Reset` announced by any process, this one included, within 1 s of the reset.
        ``heard`` does not block and never raises. Stores inherit this method as it is.
        """
        self.heard = heard

    @abc.abstractmethod
    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """Read the record and, unless it has a value to serve or a live lease, take the lease.

        In one atomic step:

        - a value younger than ``refresh`` (any value, if ``refresh`` is None), or one due for
          refresh while another holds the lease or while a failure cools down: :class:`Served`;
        - no value, and a cooldown that has not ended: :class:`Cooling`;
        - else the lease free (or expired): take it, for ``lease`` seconds without renewal,
          recording ``holder``, and return a :class:`Lease` whose ``fence`` is greater than
          every fence any earlier lease of this record had (also after a restart of the
          server), or None for a store whose lock cannot outlive its holder;
        - else :class:`Held` (naming the holder when the store knows it).

        Two claims of one record never both get a :class:`Lease` while the first is live.
        Expired values and cooldowns count as absent.
        """

    @abc.abstractmethod
    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """Extend ``lease`` to ``seconds`` from now; return False if it is lost (expired, taken,
        its session ended): the leader then stops and records nothing."""

    @abc.abstractmethod
    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """If ``lease`` is still held: in one step record ``value`` (made now, expiring after
        ``ttl`` seconds, or never if None), clear the cooldown, free the lease, and wake the
        record's watches in every process. Return False (recording nothing) if it was lost."""

    @abc.abstractmethod
    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """If ``lease`` is still held: record a failure's ``cooldown`` (seconds; None records
        none) keeping any value, free the lease, and wake the record's watches. A lost lease is
        no error. The algorithm calls it shielded, also after a cancellation."""

    @abc.abstractmethod
    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """Delete the value and cooldown of ``name``'s record for ``key`` (every key's if None);
        a lease being held stays. Then announce ``Reset(name, key, origin)`` to every live
        process's listener (this process's loops included), which must reach them within 1 s,
        and wake the watches of the record(s)."""

    @abc.abstractmethod
    def watch(self, name: str, key: str) -> AbstractAsyncContextManager[Watch]:
        """Register for changes of the record (see :class:`Watch`) for the block.

        Entered before the claim whose :class:`Held` it follows: a change after entering is not
        lost. Entering starts the loop's listener if needed and returns once it listens, or
        after a short bound (the watch then relies on its timeout until it does).
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop the running event loop's listener and close its connections; a later call
        opens new ones. Waiting watches return (their callers claim again)."""
