"""Backends that make a once run once across worker processes and hosts.

``FileLockBackend`` needs only the standard library; ``RedisBackend``, ``PostgresBackend`` and
``MySQLBackend`` need the ``redis``, ``postgres`` and ``mysql`` extras
(``pip install 'fastapi-once[redis]'``), imported on first use: importing this package imports
no driver. :func:`backend_from_url` builds one from a URL; ``once(across=)`` also takes the URL
itself, or a function returning a backend or a URL, and builds it at first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import BackendError, LeaseLostError, OnceCoolingDownError, WaitTimeoutError
from ._base import Backend
from ._late import backend_from_url
from ._lease import fencing_token

if TYPE_CHECKING:
    from ._file import FileLockBackend
    from ._mysql import MySQLBackend
    from ._postgres import PostgresBackend
    from ._redis import RedisBackend

__all__ = [
    "Backend",
    "BackendError",
    "FileLockBackend",
    "LeaseLostError",
    "MySQLBackend",
    "OnceCoolingDownError",
    "PostgresBackend",
    "RedisBackend",
    "WaitTimeoutError",
    "backend_from_url",
    "fencing_token",
]

_LAZY = {
    "FileLockBackend": "._file",
    "MySQLBackend": "._mysql",
    "PostgresBackend": "._postgres",
    "RedisBackend": "._redis",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    globals()[name] = getattr(importlib.import_module(_LAZY[name], __name__), name)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(__all__)
