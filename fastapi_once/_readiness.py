"""A readiness probe for FastAPI: 200 when the given onces are ready, 503 while they are not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ._core import Once, kick
from ._fastapi import once

_SERVING = ("ready", "refreshing")


def readiness_router(
    *onces: Callable[..., Any],
    path: str = "/ready",
    details: bool = False,
    retry_after: int = 5,
    warm: bool = True,
) -> APIRouter:
    """Return a router with one ``GET path`` route for a readiness probe (e.g. Kubernetes').

    It answers 200 when every listed once has a value, else 503 with ``Retry-After``; the JSON
    body lists each once's state. By default it shows no exception messages or tracebacks
    (they can hold secrets). Keep liveness separate: a failing dependency should take a pod out
    of rotation, not restart it.

    Args:
        *onces: the unkeyed onces (or functions, taken as ``once(fn)``) the app needs to serve.
        path: the route's path.
        details: also show each once's last error (type and message), attempt count, last
            duration and when its value was made.
        retry_after: the ``Retry-After`` seconds sent with a 503.
        warm: a probe starts making any listed once that is idle or failed (outside its
            cooldown), without waiting for it — so a pod that receives no traffic until it is
            ready still becomes ready.

    Raises:
        TypeError: no onces, or a keyed once (it has no single value to be ready).
        ValueError: ``retry_after`` is negative.
    """
    if not onces:
        raise TypeError("readiness_router() needs the onces that must be ready, e.g. (get_db,)")
    items: list[Once[Any, Any]] = [once(item) for item in onces]
    for item in items:
        if item.keyed:
            raise TypeError(
                f"readiness_router({item.name}): a keyed once has one value per key, so it is "
                "never ready as a whole; list unkeyed onces"
            )
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ValueError(f"readiness_router(retry_after={retry_after!r}): give whole seconds >= 0")
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    async def readiness(request: Request) -> JSONResponse:
        app = request.scope.get("app")
        overrides = getattr(app, "dependency_overrides", None) or {}
        report: dict[str, dict[str, Any]] = {}
        for item in items:
            if item in overrides:
                report[item.name] = {"state": "overridden"}
                continue
            status = item.status(details=details)
            if warm and status.state in ("idle", "failed") and kick(item, app):
                status = item.status(details=details)
            entry: dict[str, Any] = {"state": status.state}
            if details:
                entry.update(
                    attempts=status.attempts,
                    last_duration=status.last_duration,
                    made_at=None if status.made_at is None else status.made_at.isoformat(),
                    error=status.last_error_type,
                    message=status.last_error_message,
                )
            report[item.name] = entry
        ok = all(entry["state"] in (*_SERVING, "overridden") for entry in report.values())
        body = {"status": "ready" if ok else "unavailable", "onces": report}
        if ok:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry_after)})

    return router
