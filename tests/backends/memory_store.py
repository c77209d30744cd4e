"""An in-memory LeaseStore: the fake the algorithm's tests run on, and the contract's reference.

A :class:`MemoryServer` is the shared store (what Redis or the database is to real stores); each
:class:`MemoryStore` bound to it stands for one process's view. Time is the event loop's clock
(``anyio.current_time``): under trio's ``MockClock(autojump_threshold=0)`` leases, ttls and
cooldowns pass without waiting. The server can be taken down (every call raises
``StoreUnavailableError``) or stalled (every call hangs), to test outages.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from fastapi_once.backends._lease import StoreBackend
from fastapi_once.backends._store import (
    Claim,
    Cooling,
    Held,
    Lease,
    Reset,
    Served,
    StoreUnavailableError,
    Watch,
)


@dataclass
class _Record:
    value: str | None = None
    made: float = 0.0
    expires: float | None = None
    cool_until: float | None = None
    token: int | None = None  # the live lease's, if any
    lease_until: float = 0.0
    holder: str | None = None


class MemoryServer:
    """The state every MemoryStore bound to it shares, and the faults a test injects."""

    def __init__(self, clock: Callable[[], float] = anyio.current_time) -> None:
        self.clock = clock
        self.records: dict[tuple[str, str], _Record] = {}
        self.fences: dict[tuple[str, str], int] = {}  # survives resets, as a sequence would
        self.watches: dict[tuple[str, str], set[_MemoryWatch]] = {}
        self.listening: set[MemoryStore] = set()
        self.tokens = itertools.count(1)
        self.down = False  # every call raises StoreUnavailableError
        self.stalled = False  # every call hangs until cancelled
        self.calls = 0
        self.on_call: Callable[[int], None] | None = None  # told each call's number (from 1)

    async def enter(self) -> None:
        """What every call does first: count, then fail or hang if the test says so."""
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        await anyio.lowlevel.checkpoint()  # a store call is an await: cancellable here
        if self.stalled:
            await anyio.sleep_forever()
        if self.down:
            raise StoreUnavailableError("MemoryStore: the server is down")

    def live(self, where: tuple[str, str]) -> _Record:
        """The record at ``where``, with what has expired by now cleared."""
        now = self.clock()
        rec = self.records.setdefault(where, _Record())
        if rec.expires is not None and now >= rec.expires:
            rec.value, rec.expires = None, None
        if rec.cool_until is not None and now >= rec.cool_until:
            rec.cool_until = None
        if rec.token is not None and now >= rec.lease_until:
            rec.token = None
        return rec

    def wake(self, name: str, key: str | None) -> None:
        for (n, k), watches in self.watches.items():
            if n == name and (key is None or k == key):
                for watch in watches:
                    watch.event.set()


class _MemoryWatch(Watch):
    def __init__(self) -> None:
        self.event = anyio.Event()

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109
        with anyio.move_on_after(timeout):
            await self.event.wait()
        self.event = anyio.Event()


class MemoryStore(StoreBackend):
    """One process's view of a :class:`MemoryServer`."""

    def __init__(self, server: MemoryServer, **options: Any) -> None:
        super().__init__(**options)
        self.server = server

    def describe(self) -> str:
        return "MemoryStore"

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        await self.server.enter()
        self.server.listening.add(self)
        rec = self.server.live((name, key))
        now = self.server.clock()
        if rec.value is not None:
            fresh = refresh is None or now - rec.made < refresh
            if fresh or rec.token is not None or rec.cool_until is not None:
                return Served(rec.value)
        elif rec.cool_until is not None:
            return Cooling(rec.cool_until - now)
        if rec.token is not None:
            return Held(rec.holder)
        fence = self.server.fences[name, key] = self.server.fences.get((name, key), 0) + 1
        rec.token, rec.lease_until, rec.holder = next(self.server.tokens), now + lease, holder
        return Lease(name, key, fence, rec.token)

    def _holds(self, lease: Lease) -> _Record | None:
        rec = self.server.live((lease.name, lease.key))
        return rec if rec.token == lease.handle else None

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        await self.server.enter()
        rec = self._holds(lease)
        if rec is None:
            return False
        rec.lease_until = self.server.clock() + seconds
        return True

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        await self.server.enter()
        rec = self._holds(lease)
        if rec is None:
            return False
        now = self.server.clock()
        rec.value, rec.made, rec.expires = value, now, None if ttl is None else now + ttl
        rec.cool_until, rec.token = None, None
        self.server.wake(lease.name, lease.key)
        return True

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        await self.server.enter()
        rec = self._holds(lease)
        if rec is None:
            return
        if cooldown is not None:
            rec.cool_until = self.server.clock() + cooldown
        rec.token = None
        self.server.wake(lease.name, lease.key)

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        await self.server.enter()
        for (n, k), rec in self.server.records.items():
            if n == name and (key is None or k == key):
                rec.value, rec.expires, rec.cool_until = None, None, None
        self.server.wake(name, key)
        for store in list(self.server.listening):
            store.heard(Reset(name, key, origin))

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[Watch]:
        self.server.listening.add(self)
        watch = _MemoryWatch()
        self.server.watches.setdefault((name, key), set()).add(watch)
        try:
            yield watch
        finally:
            self.server.watches[name, key].discard(watch)

    async def aclose(self) -> None:
        self.server.listening.discard(self)
