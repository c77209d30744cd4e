"""Before the main job starts its workers: can the backend ``EXAMPLE_BACKEND_URL`` names work?

A worker whose once-per-deployment migration cannot reach its backend fails its startup, and with
several workers uvicorn's supervisor reports that only after its timeouts, with a traceback from
each worker. :func:`problem` finds the usual causes first — a URL that names no backend, a missing
driver, no server listening — and says so in one line naming the variable to set.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Mapping
from urllib.parse import SplitResult, urlsplit

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
    """Return what stops the backend ``EXAMPLE_BACKEND_URL`` names from working, in one line
    naming the variable; None if nothing does (as far as can be told without logging in)."""
    url = environ.get("EXAMPLE_BACKEND_URL", "").strip()
    scheme = urlsplit(url).scheme.lower() if url else "file"
    if scheme == "file":
        return None
    if scheme in ("redis", "rediss"):
        driver, default_port, what = "redis", 6379, "Redis"
        extra = "redis"
    elif scheme in ("postgresql", "postgres"):
        driver, default_port, what = "asyncpg", 5432, "PostgreSQL"
        extra = "postgres"
    elif scheme in ("mysql", "mariadb"):
        driver, default_port, what = "asyncmy", 3306, "MySQL"
        extra = "mysql"
    else:
        return (
            f"EXAMPLE_BACKEND_URL={masked(url)!r} names no backend: set it to file:///dir, "
            "redis://host:6379/0, postgresql://user:password@host:5432/dbname or "
            "mysql://user:password@host:3306/dbname"
        )
    if importlib.util.find_spec(driver) is None:
        install = f"pip install 'fastapi-once[{extra}]'"
        return f"EXAMPLE_BACKEND_URL={masked(url)} needs {driver}: {install}"
    why = _unreachable(urlsplit(url), default_port)
    if why:
        return (
            f"EXAMPLE_BACKEND_URL={masked(url)} but no {what} server answers there ({why}): start "
            "one, or set EXAMPLE_BACKEND_URL to a running one's URL"
        )
    return None
