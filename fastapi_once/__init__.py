"""Single-flight, once-only dependencies and lifespan for FastAPI."""

from ._core import Once, reset_all
from ._errors import OnceCancelledError, OnceCycleError, OnceError
from ._fastapi import once
from ._lifespan import once_lifespan

__all__ = [
    "Once",
    "OnceCancelledError",
    "OnceCycleError",
    "OnceError",
    "once",
    "once_lifespan",
    "reset_all",
]
