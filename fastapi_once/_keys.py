"""Keys: the unkeyed record's key, and how a key is named where operators can read it.

Keys often come from client request data (a token, a signed URL): logs, errors and status name
a key by a short stable digest, never by its text.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any


class _NoKey:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<no key>"


NOKEY: Any = _NoKey()  # the key of an unkeyed once's one record; None is an ordinary key


def key_digest(key: object) -> str:
    """A short digest of ``key`` that is stable across processes and reveals nothing of it.

    Keys equal in a process (``1``, ``1.0``, ``True``) have one digest (see :func:`canonical`).
    """
    text = canonical(key) if _portable(key) else repr(key)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


# Key types with a canonical text (a set's order, an object's id are not the same everywhere).
_PORTABLE = (str, bytes, int, float, bool, type(None))


def shared_key_digest(name: str, key: object) -> str:
    """The name of ``key``'s record in a cross-process backend: 40 hex digits, no key text.

    It starts with :func:`key_digest` (what logs show), followed by 128 bits that keep distinct
    keys apart among millions. Keys equal in a process are one record across processes.

    Raises:
        TypeError: ``key`` is not made of str, bytes, int, float, bool, None and tuples of them
            (other processes could not name it the same way).
    """
    if not _portable(key):
        raise TypeError(
            f"the key of {name} is a {type(key).__qualname__}; with across= every process must "
            "name a key the same way, so key= must return str, bytes, int, float, bool, None or "
            "a tuple of them, e.g. key=lambda url: url"
        )
    text = canonical(key).encode()
    return key_digest(key) + hashlib.blake2b(text, digest_size=16).hexdigest()


def canonical(key: object) -> str:
    """The text that names a portable ``key`` in every process: equal keys, equal texts.

    As in Python: ``True == 1 == 1.0`` (and ``False == 0 == 0.0 == -0.0``) are one key, written
    as the integer; a str and the bytes of its text are two keys; a tuple is its parts in
    order. Other floats are written by ``repr`` (``1.5``, ``inf``, ``nan``).
    """
    if key is None:
        return "n"
    if isinstance(key, (bool, int)):
        return f"i{int(key)}"
    if isinstance(key, float):
        return f"i{int(key)}" if key.is_integer() else f"f{key!r}"
    if isinstance(key, str):
        return "s" + json.dumps(key)
    if isinstance(key, bytes):
        return "b" + key.hex()
    assert isinstance(key, tuple)
    return "(" + ",".join(canonical(part) for part in key) + ")"


def _portable(key: object) -> bool:
    if isinstance(key, tuple):
        return all(_portable(part) for part in key)
    return type(key) in _PORTABLE


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


def key_call_error(
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: TypeError,
) -> TypeError:
    """The error for a keyed once's call whose key function raised ``error``.

    Arguments that do not fit the once's function name the once and its signature (the bare
    error named the user's ``key=`` lambda); any other ``TypeError`` is ``error`` itself. Only
    parameter names are shown, never the arguments' values.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return error
    try:
        signature.bind(*args, **kwargs)
    except TypeError as wrong:
        # Parameter names (and defaults) only: annotations may be strings, and are noise here.
        shown = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        return TypeError(
            f"{name}{shown} was called with arguments that do not fit: {wrong}; "
            f"call it as {name}{shown}"
        )
    return error
