"""The server's grace period at shutdown, where a lifespan can see it.

The server runs the lifespan's shutdown after its own grace period for open connections
(uvicorn's ``--timeout-graceful-shutdown``), so after SIGTERM the process exits about that plus
``once_lifespan``'s ``shutdown_timeout``, which must fit the orchestrator's grace period.
At startup, a ``shutdown_timeout`` longer than the server's grace period is logged.
"""

from __future__ import annotations

import logging
import sys

from ._telemetry import fields

logger = logging.getLogger("fastapi_once")


def server_grace() -> float | None:
    """The running server's grace period for open connections, where it can be seen.

    uvicorn's ``--timeout-graceful-shutdown``, read from the ``Config`` of the uvicorn frame that
    runs the lifespan (None: not under uvicorn, or no limit set).
    """
    config_type = getattr(sys.modules.get("uvicorn.config"), "Config", None)
    if config_type is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if "self" in frame.f_code.co_varnames:
            config = getattr(frame.f_locals.get("self"), "config", None)
            if isinstance(config, config_type):
                grace = config.timeout_graceful_shutdown
                return None if grace is None else float(grace)
        frame = frame.f_back  # type: ignore[assignment]
    return None


def check_grace(shutdown_timeout: float) -> None:
    """Log a WARNING if ``shutdown_timeout`` exceeds the server's own grace period."""
    grace = server_grace()
    if grace is None or shutdown_timeout <= grace:
        return
    logger.warning(
        "once_lifespan(shutdown_timeout=%g) is longer than the server's grace period "
        "(uvicorn --timeout-graceful-shutdown %g): after SIGTERM the process may take about "
        "%g s to exit, and an orchestrator kills it at its own grace period (Kubernetes: "
        "terminationGracePeriodSeconds, 30 s by default, minus any preStop sleep). Keep "
        "--timeout-graceful-shutdown + shutdown_timeout within it",
        shutdown_timeout,
        grace,
        grace + shutdown_timeout,
        extra=fields(None, "grace_exceeded", duration_s=shutdown_timeout),
    )
