"""The single-flight primitive: make a value once per event loop (and key), share it with all.

This module knows nothing of FastAPI; it depends on anyio only. ``Once.__call__`` serves a made
value on its hot path; everything else goes through the state machine in ``_records``.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Hashable
from threading import get_ident
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from . import _clock
from ._attempts import wait, working
from ._events import current_loop, unproven
from ._keys import NOKEY, key_call_error, shared_key_digest, unhashable
from ._kinds import as_coroutine_function, kind_of
from ._loops import (
    call_blocking,
    drain,
    hop,
    in_process_loop,
    refuse_in_loop,
    running_state,
    state_of,
)
from ._perloop import began, reset_in
from ._policy import Policy
from ._records import Injector, KeyView, Record, Resolve, Store
from ._status import OnceStatus, project
from ._telemetry import waits
from ._values import Value
from ._work import Work

if TYPE_CHECKING:
    from .backends._late import BoundBackend

if sys.version_info >= (3, 12):  # pragma: no cover
    from typing import ParamSpec, final
else:  # pragma: no cover
    from typing_extensions import ParamSpec, final

P = ParamSpec("P")
T = TypeVar("T")


_NOWHERE = (unproven, None, None)  # the hot cell before any call
_all: weakref.WeakSet[Once[Any, Any]] = weakref.WeakSet()


def registry() -> list[Once[Any, Any]]:
    """Return every once in the process, sorted by name (for readiness views and tests)."""
    return sorted(_all, key=lambda o: o.name)


@final
class Once(Generic[P, T]):
    """A function whose value is made once per event loop (or process) and shared with every caller.

    Create it with :func:`fastapi_once.once`. ``await o(...)`` returns the value: the first
    callers start one attempt in a task the library owns, everyone else waits for that same
    attempt, and once the value exists a call is an attribute check. A failed attempt is shared
    by its waiters and not cached. ``o`` is also a FastAPI dependency: ``Depends(o)``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        key: Callable[..., Hashable] | None = None,
        maxsize: int = 128,
        injector: Injector | None = None,
        across: BoundBackend | None = None,
        policy: Policy | None = None,
        options: dict[str, Any] | None = None,
        scope: str = "loop",
    ) -> None:
        self.name = name
        self.options: dict[str, Any] = dict(options or {})
        self._key = key
        self._maxsize = maxsize
        self._injector = injector
        self._across = across
        self._policy = policy or Policy()
        self._work = Work(name, fn, kind_of(fn), injector, across, self._policy)
        self._param = injector.param if injector is not None else None
        # scope="process": the values live in the process scope's loop only (so _hot, once
        # set, is that loop's, written in its thread); other threads read it or hop there.
        self._process = scope == "process"
        # (loop reference, store, unkeyed record) of the loop that called last: the hot path's
        # one read. A tuple, so a reader in another thread never mixes two loops' parts. The
        # loop is referenced weakly, and nothing else in it holds the loop: a closed loop goes.
        self._hot: tuple[Callable[[], Any], Store | None, Record | None] = _NOWHERE
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = getattr(fn, "__module__", None) or __name__
        self.__doc__ = getattr(fn, "__doc__", None)
        as_coroutine_function(self)
        _all.add(self)

    def __repr__(self) -> str:
        return f"<Once {self.name}>"

    @property
    def fn(self) -> Callable[..., Any]:
        """The function that makes the value.

        Raises:
            ReferenceError: it was a bound method whose object is gone.
        """
        return self._work.fn()

    @property
    def keyed(self) -> bool:
        """Whether the once keeps one value per key (it was made with ``key=``)."""
        return self._key is not None

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Return the value, making it first if no call in this event loop has made it yet.

        With ``scope="process"``, the value is the process's: a call from any loop waits (without
        blocking its loop) for the one attempt, which runs in the process scope's own loop.

        Raises:
            TypeError: arguments given to an unkeyed once, or an unhashable key.
            Exception: whatever the shared attempt raised; the next call tries again (or, within
                a ``cooldown``, fails fast with the same exception).
        """
        ref, store, rec = self._hot
        # The hot path: the cell's loop runs in this thread, so it is the running loop (see
        # _events.proves_thread), proven without a system call where the loop allows it.
        try:
            here = ref()._thread_id == get_ident()
        except AttributeError:  # pragma: no cover - the dying loop's callback empties the cell
            here = False  # first; only a reader in another thread can come in between
        if not here:
            if self._process and not in_process_loop():
                return cast(T, await self._elsewhere(args, kwargs))
            ref, store, rec = self._find()
        if (
            rec is not None  # only an unkeyed once's cell holds a record
            and (made := rec.made) is not None
            and not args
            and (not kwargs or (self._param in kwargs and len(kwargs) == 1))
            and (rec.until is None or _clock.monotonic() < rec.until)
        ):
            store.hits += 1  # type: ignore[union-attr]
            return made.value  # type: ignore[no-any-return]
        if self._key is None:
            key: Hashable = NOKEY
            hidden = kwargs.pop(self._param, None) if self._param is not None else None
            if args or kwargs:
                raise TypeError(
                    f"{self.name} takes no arguments: it has no key=, so it makes one value for "
                    "every caller; pass key= to keep one value per argument"
                )
        else:
            assert store is not None
            hidden = kwargs.pop(self._param, None) if self._param is not None else None
            try:
                key = self._key(*args, **kwargs)
            except TypeError as exc:
                raise key_call_error(self.name, self.fn, args, kwargs, exc) from None
            try:
                rec = store.records.get(key)
            except TypeError:
                raise unhashable(self.name, self.fn, key, args, kwargs) from None
            if (
                rec is not None
                and (made := rec.made) is not None
                and (rec.until is None or _clock.monotonic() < rec.until)
            ):
                store.records.move_to_end(key)
                store.hits += 1
                return made.value  # type: ignore[no-any-return]
        # Joining an attempt in flight with no value kept: no time row of the table can apply.
        got: Any = None if rec is None or rec.made is not None else rec.attempt
        if got is not None:
            store.joins += 1  # type: ignore[union-attr]
            if got.span is not None:
                waits(got, True)
        elif rec is None and self._key is not None:  # a keyed miss: the start row, nothing else
            injector = self._injector
            rec = store.records[key] = Record(store, key)  # type: ignore[union-attr,arg-type]
            got = rec.start(args, kwargs, None if injector is None else injector.bind(hidden))
        else:
            got = self._enter(store, key, args, kwargs, hidden)  # type: ignore[arg-type]
            if type(got) is Value:
                return got.value  # type: ignore[no-any-return]
        # The caller awaits the attempt's event itself: no coroutine between it and the event.
        if working.get() is None:  # not a once's work: no edge of the wait-for graph to add
            got.waiters += 1
            try:
                await got.done.wait()
            finally:
                got.waiters -= 1
                if not got.waiters and got.picked is not None:
                    got.picked.set()
        else:
            await wait(got)
        if got.raises is None:
            return got.value  # type: ignore[no-any-return]
        return got.result()  # type: ignore[no-any-return]

    def _find(self) -> tuple[Callable[[], Any], Store, Record | None]:
        loop = current_loop()
        hot = self._hot
        if hot[1] is not None and hot[1].loop is loop:
            return hot  # type: ignore[return-value]
        state = state_of(loop)
        store = cast("Store | None", state.stores.get(self))
        if store is None:
            store = state.stores[self] = Store(
                self.name,
                self._policy,
                self._maxsize,
                self._work.entry,
                self._forget_cell,
                loop,
                state,
                self._work.keeps,
            )
            began(self, self.name, loop, self._work.fn)  # warns if its last loop ended untorn down
        self._hot = (store.hot_loop, store, store.records.get(NOKEY))
        return self._hot

    def _forget_cell(self, store: Store | None = None) -> None:
        # Forget the hot cell (only if it is ``store``'s, when given).
        if store is None or self._hot[1] is store:
            self._hot = _NOWHERE

    async def _elsewhere(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Process scope, outside its loop: serve the made value, or call in the loop."""
        made = self._peek(args, kwargs)
        if made is not None:
            return made.value
        return await hop(lambda: self(*args, **kwargs))

    def _peek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Value | None:
        """Process scope: the value a call in its loop would serve at once, or None.

        Only reads: the process scope's records change in its loop's thread alone, and a read
        sees a record's value whole or not at all. Anything but a plain hit is left to the loop.
        """
        store, rec = self._hot[1], self._hot[2]
        if store is None:
            return None
        if self._key is not None:
            named = {k: v for k, v in kwargs.items() if k != self._param}
            try:
                rec = store.records.get(self._key(*args, **named))
            except TypeError:  # unhashable, or arguments that do not fit: the loop says which
                return None
        elif args or kwargs.keys() - {self._param}:
            return None
        if rec is None or (made := rec.made) is None:
            return None
        if rec.until is not None and _clock.monotonic() >= rec.until:
            return None
        store.hits += 1
        return made

    def get_sync(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Return the value from sync code (a worker thread, a script) for ``scope="process"``.

        Blocks the calling thread while the value is made; a made value is returned at once.

        Raises:
            TypeError: the once has ``scope="loop"`` (its values live in an event loop).
            RuntimeError: an event loop runs in this thread (``await`` the once there), or the
                interpreter's exit has closed the process scope.
            Exception: whatever the shared attempt raised, as ``await o()`` would.
        """
        if not self._process:
            raise TypeError(
                f"{self.name}.get_sync(): a once of scope='loop' keeps its values in each event "
                f"loop; await {self.name}() inside one, or make it with scope='process'"
            )
        refuse_in_loop(f"{self.name}.get_sync()")
        made = self._peek(args, kwargs)
        if made is not None:
            return made.value  # type: ignore[no-any-return]
        return call_blocking(lambda: self(*args, **kwargs))

    @property
    def process_scope(self) -> bool:
        """Whether the once was made with ``scope="process"``."""
        return self._process

    def store_here(self) -> Store:
        """This once's store in the running loop, made on first use (for the library's modules).

        With ``scope="process"``, call it in the process scope's loop only.
        """
        return self._find()[1]

    def store_seen(self) -> Store | None:
        """The running loop's store (or, outside any loop, the last one used while it lives).

        With ``scope="process"``, the process scope's store. For the library's modules.
        """
        if self._process:
            return self._hot[1]
        try:
            state = running_state()
        except RuntimeError:
            return self._hot[1]
        return None if state is None else cast("Store | None", state.stores.get(self))

    def _enter(self, store: Store, key: Hashable, args: Any, kwargs: Any, ctx: object) -> Any:
        """The slow path's rows of the table: the value to serve or the attempt to wait for."""
        now = _clock.monotonic()
        if (rec := store.records.get(key)) is None:  # a miss: nothing kept, no time row applies
            rec = store.records[key] = Record(store, key)
        else:
            rec = store.record(key, now)
        if key is NOKEY:
            self._hot = (store.hot_loop, store, rec)
        injector = self._injector
        bind = None if injector is None else lambda: injector.bind(ctx)
        return rec.enter(now, args, kwargs, bind)

    def bind(self, context: object) -> Resolve | None:
        """The sub-dependency resolver bound to ``context`` (a request or the app), if any."""
        return None if self._injector is None else self._injector.bind(context)

    async def reset(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Clean up and forget this once's value(s) in the running event loop (or the process).

        With arguments (a keyed once), only the key they map to. Work in flight is awaited first
        and what it makes is cleaned up too; a failure's cooldown and the last error are
        forgotten (with arguments: that key's, and the last error if it was that key's); the
        counters in :meth:`status` are kept. With ``across=``, the backend's
        record is cleared too, so the next call in any process runs the function again.

        Raises:
            TypeError: arguments given to an unkeyed once, or an unhashable key.
            OnceCycleError: called from inside the work it would wait for.
            Exception: what a cleanup raised, after every cleanup has run.
        """
        key: Hashable = NOKEY  # every key's value(s)
        if args or kwargs:
            if self._key is None:
                raise TypeError(f"{self.name}.reset() takes arguments only for a keyed once")
            try:
                key = self._key(*args, **kwargs)
            except TypeError as exc:
                raise key_call_error(self.name, self.fn, args, kwargs, exc) from None
            try:
                hash(key)
            except TypeError:
                raise unhashable(self.name, self.fn, key, args, kwargs) from None
        if self._process and not in_process_loop():
            return await hop(lambda: self.reset(*args, **kwargs))
        store = self.store_seen()
        try:
            if store is not None:
                view = store if key is NOKEY else KeyView(store, key)
                await drain(lambda: [view], f"{self.name}.reset()")
                if key is NOKEY:  # the once's own teardown in this loop
                    reset_in(self, current_loop())
        finally:
            if self._across is not None and self._key is None:
                await self._across.reset(self.name)
            elif self._across is not None:  # that key's record, or (no arguments) every key's
                digest = None if key is NOKEY else shared_key_digest(self.name, key)
                await self._across.reset_keyed(self.name, digest)

    def status(self, *, details: bool = False) -> OnceStatus:
        """Return a snapshot of this once in the running event loop (or the last one used, while
        it lives: a closed loop is forgotten with what it kept).

        A ``scope="process"`` once reports its one store, from any thread.

        Args:
            details: include the last error's message (off by default: it can hold secrets).
        """
        return project(self.name, self.keyed, self.store_seen(), _clock.monotonic(), details)


async def make_with(target: Once[Any, T], context: object) -> T:
    """Return an unkeyed once's value, making it with ``context`` (e.g. the app) if needed."""
    kwargs: dict[str, Any] = {target._param: context} if target._param is not None else {}
    return cast(T, await cast(Any, target)(**kwargs))


def _forget_hot_cells() -> None:
    # A forked child has none of its parent's loops running: no cell may prove one.
    for item in list(_all):
        item._hot = _NOWHERE


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_hot_cells)
