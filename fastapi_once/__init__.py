"""Single-flight, once-only dependencies and lifespan for FastAPI."""

import importlib.metadata

from ._core import Once, registry
from ._errors import (
    OnceCancelledError,
    OnceClosedError,
    OnceCycleError,
    OnceError,
    OnceTimeoutError,
)
from ._fastapi import once
from ._lifespan import once_closed_handler, once_lifespan
from ._loops import reset_all
from ._perloop import OnceLoopWarning
from ._readiness import readiness_router
from ._status import OnceStatus

__all__ = [
    "Once",
    "OnceCancelledError",
    "OnceClosedError",
    "OnceCycleError",
    "OnceError",
    "OnceLoopWarning",
    "OnceStatus",
    "OnceTimeoutError",
    "once",
    "once_closed_handler",
    "once_lifespan",
    "readiness_router",
    "registry",
    "reset_all",
]

#: The installed distribution's version (``pip show fastapi-once``), read from its metadata.
try:
    __version__: str = importlib.metadata.version("fastapi-once")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree never installed
    __version__ = "0+unknown"
