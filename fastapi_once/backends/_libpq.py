"""Connection strings for asyncpg: a URL as it is, a libpq ``key=value`` string parsed."""

from __future__ import annotations

import re
from typing import Any

from ._base import Scrubber

# libpq connection keywords and the asyncpg.connect() arguments they become.
_KEYWORDS = {
    "host": "host",
    "hostaddr": "host",
    "port": "port",
    "user": "user",
    "password": "password",
    "passfile": "passfile",
    "dbname": "database",
    "sslmode": "ssl",
    "service": "service",
    "servicefile": "servicefile",
    "target_session_attrs": "target_session_attrs",
    "krbsrvname": "krbsrvname",
    "gsslib": "gsslib",
}
_CONNINFO = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)\s*")


def connect_args(dsn: str, scrub: Scrubber) -> dict[str, Any]:
    """asyncpg.connect()'s arguments for ``dsn``: a URL as it is, a libpq string parsed.

    Raises:
        ValueError: a ``key=value`` string that cannot be parsed or has an unknown keyword.
    """
    if "://" in dsn or not dsn.strip():
        return {"dsn": dsn}
    args: dict[str, Any] = {}
    position = 0
    while position < len(dsn):
        match = _CONNINFO.match(dsn, position)
        if match is None:
            raise ValueError(
                f"PostgresBackend({scrub.shown!r}): cannot read the connection string at "
                f"character {position}; write key=value pairs separated by spaces, quoting "
                "values with spaces as key='a value'"
            )
        keyword, value = match.group(1).lower(), match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if keyword == "connect_timeout" or keyword == "application_name":
            pass  # the backend sets these itself
        elif keyword not in _KEYWORDS:
            raise ValueError(
                f"PostgresBackend(...): the connection keyword {keyword!r} is not supported; "
                f"use {', '.join(sorted(_KEYWORDS))}, or a postgresql:// URL"
            )
        else:
            args[_KEYWORDS[keyword]] = int(value) if keyword == "port" else value
        position = match.end()
    return args
