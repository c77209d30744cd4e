"""The warning that a once's values are made per event loop, as under a bare ``TestClient(app)``.

``TestClient(app)`` without ``with`` runs each request in an event loop of its own and runs no
lifespan, so every request makes the once's value anew (and a value with a cleanup is cleaned up
only as its loop ends). Two signs of it are reported as :class:`OnceLoopWarning`, a
``UserWarning`` (shown under Python's and pytest's default filters), attributed to the line that
defines the once's function:

- a once begins to be used in a loop while the loop that used it before has ended without a
  teardown (``once_lifespan``'s shutdown, ``reset_all()``, the ``once_reset`` fixture);
- a value with a cleanup is still in service when its loop ends (reported by the loop).

Locking: ``_lock`` guards ``_last``; the warnings are issued outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

FIX = (
    "Use `with TestClient(app)` (a bare TestClient(app) runs each request in a new event loop "
    "and no lifespan), once_lifespan, the once_reset fixture, or await reset_all() before the "
    "loop ends"
)


class OnceLoopWarning(UserWarning):
    """A once's value was made per event loop: usually ``TestClient(app)`` without ``with``.

    Each request then makes the value again, and a value with a cleanup is cleaned up only as
    its loop ends. Raised at the line that defines the once's function.
    """


# once -> its name and the loop that last began using it, until a teardown there forgets it.
_last: weakref.WeakKeyDictionary[object, tuple[str, weakref.ref[object]]] = (
    weakref.WeakKeyDictionary()
)
# once name -> where its function is defined (file, line, module), if it has Python source.
_where: dict[str, tuple[str, int, str] | None] = {}
_lock = threading.Lock()
# The warnings registry of this module's warnings: the "default" action shows each once's
# warning once per filter configuration, as for any warning raised at one line.
_registry: dict[Any, Any] = {}


def began(once: object, name: str, loop: object, fn: Callable[[], Callable[..., Any]]) -> None:
    """``once`` is used in ``loop`` for the first time: warn if its last loop ended untorn down.

    Args:
        once: the once.
        name: its name.
        loop: the running loop (an asyncio loop or a trio token).
        fn: returns the once's function, for the warning's location.
    """
    where = _source(fn)
    with _lock:
        before = _last.get(once)
        _last[once] = (name, weakref.ref(loop))
        _where[name] = where
    if before is None:
        return
    earlier = before[1]()
    ended = earlier is None or (
        isinstance(earlier, asyncio.AbstractEventLoop) and earlier.is_closed()
    )
    if ended:
        report(
            name,
            f"{name}: its value is made again in a new event loop, because the loop that made it "
            "before has ended without a teardown",
        )


def left_to_loop_end(name: str) -> None:
    """A value of once ``name`` was cleaned up only as its loop ended: report it now.

    The loop's next use of the once then warns no more (this report has said it).
    """
    with _lock:
        for once, (named, _) in list(_last.items()):
            if named == name:
                del _last[once]
    report(
        name,
        f"{name}: a value was still in service when its event loop ended, so its cleanup ran at "
        "loop shutdown rather than at a teardown",
    )


def torn_down(loop: object) -> None:
    """``loop``'s onces were torn down: a later loop making them again is expected."""
    with _lock:
        for once, (_, ref) in list(_last.items()):
            if ref() is loop:
                del _last[once]


def forget_all() -> None:
    """Every loop's onces were forgotten (the ``once_reset`` fixture)."""
    with _lock:
        _last.clear()


def report(name: str, what: str) -> None:
    """Issue :class:`OnceLoopWarning` ``what`` at the line that defines once ``name``'s function."""
    message = f"{what}. {FIX}"
    with _lock:
        where = _where.get(name)
    # A library task may be the caller: warnings turned into errors cannot be raised from it.
    with contextlib.suppress(Warning):
        if where is None:
            warnings.warn(message, OnceLoopWarning, stacklevel=3)
            return
        filename, lineno, module = where
        warnings.warn_explicit(
            message, OnceLoopWarning, filename, lineno, module=module, registry=_registry
        )


def _source(fn: Callable[[], Callable[..., Any]]) -> tuple[str, int, str] | None:
    """The file, line and module of the once's function, if it has Python source."""
    try:
        target: Any = fn()
    except ReferenceError:
        return None
    for _ in range(16):  # bound methods, partials and wrappers, down to the function
        if isinstance(target, (functools.partial, functools.partialmethod)):
            target = target.func
        elif hasattr(target, "__func__"):
            target = target.__func__
        else:
            break
    target = inspect.unwrap(target)
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    return code.co_filename, code.co_firstlineno, getattr(target, "__module__", None) or "?"
