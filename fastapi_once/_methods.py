"""``@once`` on methods: one value per instance, bound through the descriptor protocol.

A function defined in a class body whose first parameter is ``self`` (or a
``functools.partialmethod``) becomes a :class:`OnceMethod`. ``obj.method`` is then the instance's
own :class:`~fastapi_once.Once`, made on first access with the options given to ``@once`` and
the same for as long as ``obj`` lives; ``type(obj).method(obj)`` serves the same value.

The instance is held weakly (a generator method's ``self`` is a :func:`weakref.proxy`, since its
suspended frame lives as long as the value). When the instance is collected, its once's values
are retired in every event loop that made one (each cleanup runs once, in the task that made
the value) and the once is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any

from ._attempts import working
from ._kinds import Kind, as_coroutine_function, kind_of
from ._loops import drain, every_state
from ._tasks import spawn

if TYPE_CHECKING:
    from ._core import Once
    from ._loops import Drainable, LoopState

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

Make = Callable[[Callable[..., Any], dict[str, Any]], "Once[Any, Any]"]


def is_method(fn: object) -> bool:
    """Whether ``fn`` is a method to bind per instance: a ``functools.partialmethod``, or a
    function defined in a class body (its qualified name ends ``Class.name``, not
    ``<locals>.name``) whose first parameter is ``self``."""
    if isinstance(fn, functools.partialmethod):
        return True
    return first_in_class(fn) == "self"


def first_in_class(fn: object) -> str | None:
    """The name of the first positional parameter of ``fn``, a function defined in a class
    body (``self``: a method; ``cls``: a classmethod's function); None for anything else."""
    if not inspect.isfunction(fn):
        return None
    parts = fn.__qualname__.split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return None
    try:
        first = next(iter(inspect.signature(fn).parameters.values()), None)
    except (TypeError, ValueError):  # pragma: no cover - a function always has a signature
        return None
    return first.name if first is not None and first.kind in _POSITIONAL else None


def classmethod_refused(fn: object) -> TypeError:
    """The error for ``@once`` stacked with ``@classmethod`` (in either order), with the fix."""
    name = getattr(getattr(fn, "__func__", fn), "__qualname__", repr(fn))
    return TypeError(
        f"@once on {name}: a classmethod has one value per class, which @once cannot bind in "
        f"the class body; drop @once there and, after the class is defined, use once({name}) "
        "(the class's bound method: one value for the class; with key=, one per key), or make "
        "it a module-level function"
    )


class BoundMethod:
    """A method bound weakly to one instance: what that instance's once calls.

    Its signature is the method's without ``self`` (and without what a partialmethod fixed), so
    FastAPI sees the parameters it resolves; ``__wrapped__`` is the method, so its kind and its
    module's names (for string annotations) are read from there.
    """

    def __init__(self, method: OnceMethod, ref: weakref.ref[Any]) -> None:
        self._method, self._ref = method, ref
        self.__wrapped__ = method.func
        self.__signature__ = method.signature
        self.__name__ = method.__name__
        self.__qualname__ = method.__qualname__
        self.__module__ = method.__module__
        self.__doc__ = method.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method on the instance (a generator method: on a weak proxy to it).

        Raises:
            ReferenceError: the instance no longer exists.
        """
        obj = self._ref()
        if obj is None:
            raise ReferenceError(
                f"{self.__qualname__}: its instance was collected; keep a reference to the "
                "instance for as long as its once is used"
            )
        method = self._method
        me = weakref.proxy(obj) if method.proxied else obj
        return method.func(me, *method.args, *args, **{**method.keywords, **kwargs})


class _StandIn:
    """An instance to bind a method to when checking its options at decoration time."""


class OnceMethod:
    """``@once`` on a method: ``obj.method`` is the instance's :class:`~fastapi_once.Once`.

    Options given to ``@once(...)`` apply to every instance's once. ``obj.method`` is the same
    once for as long as ``obj`` lives, so ``Depends(obj.method)``, ``await obj.method()``,
    ``obj.method.reset()`` and ``obj.method.status()`` all work on the instance's value(s); a
    keyed method's ``key=`` function takes the method's arguments without ``self``.
    ``type(obj).method(obj, *args)`` is ``obj.method(*args)``.
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any], make: Make) -> None:
        self.args: tuple[Any, ...] = ()
        self.keywords: dict[str, Any] = {}
        func = fn
        if isinstance(fn, functools.partialmethod):
            func, self.args, self.keywords = fn.func, tuple(fn.args), dict(fn.keywords)
        self.func: Callable[..., Any] = func
        if options.get("across") is not None:
            raise TypeError(
                f"once({getattr(func, '__qualname__', func)}, across=...): across= shares one "
                "result under one name, but a method makes one value per instance; put the "
                "shared work in a module-level function with across= and call it from the method"
            )
        self.options = dict(options)
        self._make = make
        # The signature without self and what a partialmethod fixed (None takes self's place:
        # nothing is called).
        partial = inspect.signature(functools.partial(func, None, *self.args, **self.keywords))
        self.signature = partial.replace(
            parameters=[p for p in partial.parameters.values() if p.name not in self.keywords]
        )
        # A generator method's frame lives as long as its value: it gets a proxy as self, so
        # that the value does not keep its instance alive.
        self.proxied = kind_of(func) in (Kind.ASYNC_GEN, Kind.GEN)
        self.__name__: str = getattr(func, "__name__", "method")
        self.__qualname__: str = getattr(func, "__qualname__", self.__name__)
        self.__module__ = getattr(func, "__module__", None) or __name__
        self.__doc__ = getattr(func, "__doc__", None)
        # The instance's once by id(instance), with the weak reference that tells it apart from
        # a later object with the same id. _lock (reentrant: a collection can run the
        # callback while the lock is held) guards creation; lookups read without it.
        self._bound: dict[int, tuple[weakref.ref[Any], Once[Any, Any]]] = {}
        self._lock = threading.RLock()
        as_coroutine_function(self)
        make(BoundMethod(self, weakref.ref(_StandIn())), self.options)  # the options' checks

    def __repr__(self) -> str:
        return f"<OnceMethod {self.__module__}.{self.__qualname__}>"

    def __set_name__(self, owner: type, name: str) -> None:
        self.__name__, self.__qualname__ = name, f"{owner.__qualname__}.{name}"

    def again(self, options: dict[str, Any]) -> OnceMethod:
        """Return this descriptor for ``once(method, **options)`` asked again.

        Raises:
            ValueError: other explicit options than the first time.
        """
        if options and options != self.options:
            raise ValueError(
                f"once({self.__qualname__}) already exists with options {self.options!r}; asking "
                f"again with {options!r} would need a second, different once. Pass the same "
                f"options, or call once({self.__qualname__}) without options to get it"
            )
        return self

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        """The instance's once (the descriptor itself when looked up on the class)."""
        if obj is None:
            return self
        entry = self._bound.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return self._bind(obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """``type(obj).method(obj, ...)``: the same as ``obj.method(...)``.

        Raises:
            TypeError: no instance given (e.g. ``Depends(Cls.method)``).
        """
        if not args:
            raise TypeError(
                f"{self.__qualname__}() needs the instance whose value it is: each instance has "
                f"its own once; call obj.{self.__name__}() and, in a route, depend on "
                f"Depends(obj.{self.__name__})"
            )
        bound: Once[Any, Any] = self.__get__(args[0], type(args[0]))
        return bound(*args[1:], **kwargs)

    async def reset(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the class's method has no values of its own; each instance's once has them.

        Raises:
            TypeError: always, naming ``obj.method.reset()`` and ``reset_all()``.
        """
        raise TypeError(
            f"{self.__qualname__}.reset(): each instance has its own once; reset one instance's "
            f"values with obj.{self.__name__}.reset(), or every value in the loop with reset_all()"
        )

    def status(self, *, details: bool = False) -> Any:
        """Refused: the class's method has no status of its own; each instance's once has one.

        Raises:
            TypeError: always, naming ``obj.method.status()``.
        """
        raise TypeError(
            f"{self.__qualname__}.status(): each instance has its own once; read one instance's "
            f"with obj.{self.__name__}.status()"
        )

    def _bind(self, obj: object) -> Once[Any, Any]:
        key = id(obj)
        with self._lock:
            entry = self._bound.get(key)
            if entry is not None and entry[0]() is obj:
                return entry[1]
            try:
                ref = weakref.ref(obj, lambda ref: self._collected(key, ref))
            except TypeError:
                raise TypeError(
                    f"@once on {self.__qualname__}: a {type(obj).__name__} cannot be referenced "
                    "weakly, and its once must not keep it alive; add '__weakref__' to its "
                    "__slots__"
                ) from None
            made = self._make(BoundMethod(self, ref), self.options)
            self._bound[key] = (ref, made)
            return made

    def _collected(self, key: int, ref: weakref.ref[Any]) -> None:
        """The instance is gone (any thread, during a collection): retire its values."""
        with self._lock:
            entry = self._bound.get(key)
            if entry is None or entry[0] is not ref:
                return
            del self._bound[key]
        forget(entry[1])


def refuse_class_level(item: object, where: str) -> None:
    """Raise if ``item`` is a once method looked up on its class, where a once is needed.

    Raises:
        TypeError: ``item`` is a :class:`OnceMethod`: it has no value, each instance's once has.
    """
    if isinstance(item, OnceMethod):
        raise TypeError(
            f"{where}({item.__qualname__}): that is the method of every instance, each with its "
            f"own once and value; pass one instance's once, obj.{item.__name__}"
        )


def forget(target: Once[Any, Any]) -> None:
    """Retire ``target``'s values in every event loop, then forget it there (any thread)."""
    for state in every_state():
        store = state.stores.get(target)
        if store is None:
            continue
        loop: Any = store.loop  # type: ignore[attr-defined]
        start = functools.partial(_start_forgetting, state, target, store, loop)
        # A loop that has ended drops its state with it: nothing is left to clean up there.
        with contextlib.suppress(RuntimeError):
            if isinstance(loop, asyncio.AbstractEventLoop):
                loop.call_soon_threadsafe(start)
            else:
                loop.run_sync_soon(start)


def _start_forgetting(
    state: LoopState, target: Once[Any, Any], store: Drainable, loop: object
) -> None:
    work = _forget_in_loop(state, target, store)
    try:
        spawn(loop, work, "fastapi_once: instance collected")
    except RuntimeError:  # the loop is ending (trio): its end cleans up what is left
        work.close()


async def _forget_in_loop(state: LoopState, target: Once[Any, Any], store: Drainable) -> None:
    working.set(None)  # this task waits for no attempt's work but its own
    try:
        # A cleanup's error is logged where it runs; nobody is here to raise it to.
        with contextlib.suppress(Exception):
            await drain(lambda: [store], f"{target.name} (instance collected)")
    finally:
        if state.stores.get(target) is store:
            del state.stores[target]


# Interned descriptors, held weakly (their class holds them): once(f) is once(f) for a method.
_interned: weakref.WeakValueDictionary[Hashable, OnceMethod] = weakref.WeakValueDictionary()
_interned_lock = threading.Lock()


def method_once(fn: Callable[..., Any], options: dict[str, Any], make: Make) -> OnceMethod:
    """The :class:`OnceMethod` of ``fn`` (a method, see :func:`is_method`), made on first ask.

    Raises:
        TypeError, ValueError: as :func:`~fastapi_once.once` for the options; ``fn`` already has
            a once with other options.
    """
    with _interned_lock:
        existing = _interned.get(fn)
        if existing is None:
            existing = _interned[fn] = OnceMethod(fn, options, make)
            return existing
    return existing.again(options)
