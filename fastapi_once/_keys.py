"""Keys: the unkeyed record's key, and how a key is named where operators can read it.

Keys often come from client request data (a token, a signed URL): logs, errors and status name
a key by a short stable digest, never by its text.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from typing import Any


class _NoKey:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no key>"


NOKEY: Any = _NoKey()  # the key of an unkeyed once's one record; None is an ordinary key


def key_digest(key: object) -> str:
    """A short digest of ``key`` that is stable across processes and reveals nothing of it."""
    return hashlib.blake2b(repr(key).encode(), digest_size=4).hexdigest()


def label(name: str, key: object, verbatim: bool = False) -> str:
    """How logs and errors name the attempt of once ``name`` for ``key``.

    By its digest, unless the once opted in to show its keys (``verbatim``).
    """
    if key is NOKEY:
        return name
    return f"{name}[{key!r}]" if verbatim else f"{name}[#{key_digest(key)}]"


def unhashable(
    name: str, fn: Callable[..., Any], key: object, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TypeError:
    """The error for a key that cannot be hashed, naming the parameters at fault."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    culprits = [param for param, value in bound.items() if not _hashable(value)]
    where = f" (parameter {', '.join(map(repr, culprits))})" if culprits else ""
    return TypeError(
        f"the key of {name} is an unhashable {type(key).__name__}{where}; pass key= a "
        "function that returns a hashable value, e.g. key=lambda items: tuple(items)"
    )


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
