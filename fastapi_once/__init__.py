"""Single-flight, once-only dependencies and lifespan for FastAPI."""

from ._core import Once, registry
from ._errors import (
    OnceCancelledError,
    OnceClosedError,
    OnceCycleError,
    OnceError,
    OnceTimeoutError,
)
from ._fastapi import once
from ._lifespan import once_lifespan
from ._loops import reset_all
from ._readiness import readiness_router
from ._status import OnceStatus

__all__ = [
    "Once",
    "OnceCancelledError",
    "OnceClosedError",
    "OnceCycleError",
    "OnceError",
    "OnceStatus",
    "OnceTimeoutError",
    "once",
    "once_lifespan",
    "readiness_router",
    "registry",
    "reset_all",
]
