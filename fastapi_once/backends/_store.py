"""The store protocol: the few primitives a cross-process backend implements with its own means.

A record is named by the once's name and a key: the key's canonical digest (40 hex digits) for a
keyed once, :data:`UNKEYED` for an unkeyed one. A store implements :class:`LeaseStore` keeping no
policy (no retries, timeouts, backoff or JSON encoding: that is ``_lease.StoreBackend``'s) and
passes ``tests/backends/store_contract.py`` against its real server;
``tests/backends/memory_store.py`` is a complete store to read first. How each store makes the
primitives: the table in ``docs/across.md``.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .._errors import BackendError
from .._logs import fields

logger = logging.getLogger("fastapi_once")

#: The key of an unkeyed once's one record (a digest is 40 hex digits: never this).
UNKEYED = "-"


class StoreUnavailableError(BackendError):
    """The store cannot be reached (refused or broken connection, no answer in time).

    The one exception a store raises for an outage; any other failure of the server is a plain
    :class:`~fastapi_once.backends.BackendError`. The message never holds a credential.
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
    """The claim found no value to serve, and another's live lease: wait for a change."""

    holder: str | None  #: who holds it (``"pid 1234 on web-1"``), or None if unknown


@dataclass
class Lease:
    """The claim took the lease: the caller leads. ``handle`` is the store's own (a token, a
    file, a connection), handed back to ``renew``, ``complete`` or ``abandon`` unchanged."""

    name: str
    key: str
    fence: int | None  #: the fencing token, or None where the lock ends with its holder
    handle: Any = field(default=None, repr=False)


#: What :meth:`LeaseStore.claim` returns.
Claim: TypeAlias = Served | Cooling | Lease | Held


@dataclass(frozen=True)
class Reset:
    """A record reset in some process: every live process forgets its value(s) for it."""

    name: str
    key: str | None  #: the key reset, :data:`UNKEYED`, or None for every key of ``name``
    origin: str  #: who reset it, as given to :meth:`LeaseStore.clear` (opaque to the store)

    def to_json(self) -> str:
        """The reset as the JSON text a store sends to the other processes."""
        return json.dumps({"name": self.name, "key": self.key, "origin": self.origin})

    @classmethod
    def from_json(cls, text: str | bytes) -> Reset | None:
        """The reset that :meth:`to_json` made ``text`` from; None, logging a warning, for
        anything else (whoever can write to a store's channel can send it anything)."""
        try:
            data = json.loads(text)
            name, key, origin = data["name"], data["key"], data["origin"]
            if isinstance(name, str) and isinstance(origin, str) and isinstance(key, str | None):
                return cls(name, key, origin)
        except (ValueError, KeyError, TypeError):
            pass
        logger.warning(
            "ignored a reset message that is not one of ours",
            extra=fields(None, "reset_message_ignored"),
        )
        return None


class Watch(abc.ABC):
    """A registration for changes of one record, made before the claim it follows."""

    @abc.abstractmethod
    async def changed(self, timeout: float) -> None:
        """Return soon after any ``complete``, ``abandon`` or ``clear`` of the record (in any
        process) since the watch was entered or this last returned, or after ``timeout``.

        May return early (the caller claims again), and returns after a lost connection (changes
        may have been missed). Holds no connection of its own; raises only cancellation.
        """


#: What a store calls for each reset it hears (see :meth:`LeaseStore.bind`).
Heard: TypeAlias = Callable[[Reset], None]


class LeaseStore(abc.ABC):
    """The primitives of one cross-process store.

    A call cancelled at any await leaves the store as if it had run whole or not at all (a lease
    a cancelled ``claim`` took ends within ``lease`` seconds at the latest). Methods raise
    :class:`StoreUnavailableError` for an outage, ``BackendError`` for any other failure, and
    nothing else. At most one listener (and connection) per event loop, and a bounded number of
    connections; the loop's end ends them, ``aclose()`` or not, within a bounded time.
    """

    #: The callback for resets heard (see :meth:`bind`); until bound, resets are dropped.
    heard: Heard = staticmethod(lambda reset: None)

    def bind(self, heard: Heard) -> None:
        """Set the callback the store's listener calls, on its loop, for every :class:`Reset`
        of any process (this one included) within 1 s. The listener of a loop starts at its
        first claim or watch and runs until :meth:`aclose` or the loop's end; ``heard`` does not
        block and never raises."""
        self.heard = heard

    @abc.abstractmethod
    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """In one atomic step, return:

        - :class:`Served`: a value younger than ``refresh`` (any, if None), or one due for
          refresh while another holds the lease or a failure cools down;
        - :class:`Cooling`: no value, and a cooldown not yet ended;
        - :class:`Lease`: the lease was free or expired and is now taken for ``lease`` seconds,
          recording ``holder``; its ``fence`` exceeds every earlier lease's of the record (also
          across server restarts), or is None where the lock cannot outlive its holder;
        - :class:`Held`: another's live lease.

        Two claims never both get a live :class:`Lease`. Expired values and cooldowns are absent.
        """

    @abc.abstractmethod
    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """Extend ``lease`` to ``seconds`` from now; False if it is lost."""

    @abc.abstractmethod
    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """If ``lease`` is held, in one step: record ``value`` (expiring after ``ttl``, or
        never), clear the cooldown, free the lease, wake the record's watches everywhere.
        False (recording nothing) if it was lost."""

    @abc.abstractmethod
    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """If ``lease`` is held: record ``cooldown`` (if not None) keeping any value, free the
        lease, wake the watches. A lost lease is no error."""

    @abc.abstractmethod
    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """Delete the value and cooldown of the record for ``key`` (every key's if None),
        keeping a held lease; announce ``Reset(name, key, origin)`` to every process's
        listener (within 1 s) and wake the record's watches."""

    @abc.abstractmethod
    def watch(self, name: str, key: str) -> AbstractAsyncContextManager[Watch]:
        """Watch the record for the block (entered before the claim it follows). Entering
        starts the loop's listener and returns once it listens, or after a short bound."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop the running loop's listener and close its connections (a later call opens new
        ones); waiting watches return."""
