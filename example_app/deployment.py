"""The backend of the example's once-per-deployment task, chosen by environment variables.

``EXAMPLE_BACKEND`` picks it (the driver is imported only when the task runs):

- ``file`` (the default): :class:`~fastapi_once.backends.FileLockBackend` in ``$EXAMPLE_LOCK_DIR``,
  or in a ``fastapi_once-locks`` directory next to the database file; the processes of one host.
- ``redis``: :class:`~fastapi_once.backends.RedisBackend` at ``$EXAMPLE_REDIS_URL`` (default
  ``redis://127.0.0.1:6379/0``); needs ``pip install 'fastapi-once[redis]'``.
- ``postgres``: :class:`~fastapi_once.backends.PostgresBackend` at ``$EXAMPLE_POSTGRES_DSN``;
  needs ``pip install 'fastapi-once[postgres]'``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from fastapi_once.backends import Backend

#: The values ``EXAMPLE_BACKEND`` takes.
KINDS = ("file", "redis", "postgres")

#: The lock directory's name, next to the database file, unless ``EXAMPLE_LOCK_DIR`` is set.
LOCK_DIR_NAME = "fastapi_once-locks"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def backend_kind(environ: Mapping[str, str] = os.environ) -> str:
    """Return ``$EXAMPLE_BACKEND`` (default ``file``).

    Raises:
        ValueError: it is none of :data:`KINDS`.
    """
    kind = environ.get("EXAMPLE_BACKEND", "").strip().lower() or "file"
    if kind not in KINDS:
        raise ValueError(
            f"EXAMPLE_BACKEND={kind!r}: set it to one of {', '.join(KINDS)} (or leave it unset "
            "for file)"
        )
    return kind


def build_backend(database_file: str, environ: Mapping[str, str] = os.environ) -> Backend:
    """Build the backend that ``environ`` selects, for the database at ``database_file``.

    Raises:
        ValueError: ``EXAMPLE_BACKEND`` is unknown, or ``postgres`` without
            ``EXAMPLE_POSTGRES_DSN``.
        ImportError: the selected backend's driver is not installed.
    """
    kind = backend_kind(environ)
    if kind == "redis":
        from fastapi_once.backends import RedisBackend

        return RedisBackend(environ.get("EXAMPLE_REDIS_URL") or DEFAULT_REDIS_URL)
    if kind == "postgres":
        dsn = environ.get("EXAMPLE_POSTGRES_DSN")
        if not dsn:
            raise ValueError(
                "EXAMPLE_BACKEND=postgres needs EXAMPLE_POSTGRES_DSN, e.g. "
                "postgresql://user:password@127.0.0.1:5432/dbname"
            )
        from fastapi_once.backends import PostgresBackend

        return PostgresBackend(dsn)
    from fastapi_once.backends import FileLockBackend

    directory = environ.get("EXAMPLE_LOCK_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(database_file)), LOCK_DIR_NAME
    )
    return FileLockBackend(directory)


def marker_name(name: str, database_file: str) -> str:
    """Return the backend's name for ``name`` run on the database at ``database_file``.

    The task is "migrate this database": a new database file (the burst's fresh one, or a test's)
    is migrated again, while every process of one deployment shares one marker.
    """
    digest = hashlib.sha256(os.path.abspath(database_file).encode()).hexdigest()[:16]
    return f"{name}/db-{digest}"


class DeploymentBackend(Backend):
    """The ``EXAMPLE_BACKEND`` backend, built when a task runs and closed when it returns.

    ``once(across=)`` takes its backend when the module is imported; this one reads the
    environment and imports a driver only when the task runs, so importing the app needs neither
    a server nor a driver.

    Args:
        database_file: returns the path of the database file the tasks work on.
    """

    def __init__(self, database_file: Callable[[], Awaitable[str]]) -> None:
        self._database_file = database_file

    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        """Run ``work`` once across the processes sharing the selected backend."""
        path = await self._database_file()
        backend = build_backend(path)
        try:
            return await backend.run_once(marker_name(name, path), work, ttl=ttl)
        finally:
            with anyio.CancelScope(shield=True):
                await backend.aclose()

    async def reset(self, name: str) -> None:
        """Clear the marker of ``name`` on this database, so that the task runs again."""
        path = await self._database_file()
        backend = build_backend(path)
        try:
            await backend.reset(marker_name(name, path))
        finally:
            with anyio.CancelScope(shield=True):
                await backend.aclose()

    def describe(self) -> str:
        """Return ``DeploymentBackend(EXAMPLE_BACKEND=<kind>)``."""
        return f"DeploymentBackend(EXAMPLE_BACKEND={os.environ.get('EXAMPLE_BACKEND') or 'file'})"
