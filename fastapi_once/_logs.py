"""The fields of every log record of the ``fastapi_once`` logger (the backends log them too)."""

from __future__ import annotations

from typing import Any


def fields(
    once: str | None,
    event: str,
    *,
    duration_s: float | None = None,
    error_type: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    """The ``extra`` of every log record: the same five fields, None where they do not apply."""
    return {
        "once": once,
        "event": event,
        "duration_s": duration_s,
        "error_type": error_type,
        "attempt": attempt,
    }


def error_type(error: BaseException | None) -> str | None:
    """How logs, spans and metrics name an exception: its type's name, never its text."""
    return None if error is None else type(error).__name__
