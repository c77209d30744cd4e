"""Before the main job starts its workers: can the backend that ``EXAMPLE_BACKEND`` selects work?

A worker whose once-per-deployment migration cannot reach its backend fails its startup, and with
several workers uvicorn's supervisor reports that only after its timeouts, with a traceback from
each worker. :func:`problem` finds the usual causes first — an unknown backend, a missing driver,
a missing DSN, no server listening — and says in one line which variable to set.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit

#: The Redis server ``EXAMPLE_BACKEND=redis`` uses unless ``EXAMPLE_REDIS_URL`` says otherwise
#: (the same default as :mod:`example_app.deployment`).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: How long to wait for a backend's server to accept a connection, in seconds.
CONNECT_TIMEOUT = 2.0


def masked(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def _unreachable(parts: SplitResult, default_port: int) -> str | None:
    """Why nothing accepts a TCP connection at ``parts``' host and port; None if something does
    (or if the address is not a plain host and port, such as a Unix socket)."""
    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:  # several hosts, or a port that is not a number: leave it to the driver
        return None
    if not host or host.startswith("/"):
        return None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def problem(environ: Mapping[str, str]) -> str | None:
    """Return what stops the selected backend from working, in one line naming the variable to
    set; None if nothing does (as far as can be told without logging in)."""
    kind = environ.get("EXAMPLE_BACKEND", "").strip().lower() or "file"
    if kind == "file":
        return None
    if kind == "redis":
        if importlib.util.find_spec("redis") is None:
            return "EXAMPLE_BACKEND=redis needs redis-py: pip install 'fastapi-once[redis]'"
        url = environ.get("EXAMPLE_REDIS_URL") or DEFAULT_REDIS_URL
        parts = urlsplit(url)
        why = _unreachable(parts, 6379) if parts.scheme in ("redis", "rediss") else None
        if why:
            return (
                f"EXAMPLE_BACKEND=redis but no Redis server answers at {masked(url)} ({why}): "
                "start one, or set EXAMPLE_REDIS_URL to the URL of a running one"
            )
        return None
    if kind == "postgres":
        if importlib.util.find_spec("asyncpg") is None:
            return "EXAMPLE_BACKEND=postgres needs asyncpg: pip install 'fastapi-once[postgres]'"
        dsn = environ.get("EXAMPLE_POSTGRES_DSN")
        if not dsn:
            return (
                "EXAMPLE_BACKEND=postgres needs EXAMPLE_POSTGRES_DSN: set it to a database's DSN, "
                "e.g. postgresql://user:password@127.0.0.1:5432/dbname"
            )
        why = _unreachable(urlsplit(dsn), 5432)
        if why:
            return (
                f"EXAMPLE_BACKEND=postgres but no PostgreSQL server answers at {masked(dsn)} "
                f"({why}): start one, or set EXAMPLE_POSTGRES_DSN to a running one's DSN"
            )
        return None
    return (
        f"EXAMPLE_BACKEND={kind!r} is not a backend: set EXAMPLE_BACKEND to file, redis or postgres"
    )
