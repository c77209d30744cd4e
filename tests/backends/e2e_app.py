"""An app whose startup runs a once-per-deployment task across its uvicorn workers.

Run by test_uvicorn_workers.py as ``uvicorn e2e_app:app --workers 2``; the environment variable
``FASTAPI_ONCE_E2E`` (JSON: backend spec, log file, once name) selects the backend.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from backend_worker import append, build_backend
from fastapi import Depends, FastAPI

from fastapi_once import once, once_lifespan

config = json.loads(os.environ["FASTAPI_ONCE_E2E"])
backend = build_backend(config["spec"])
log = Path(config["log"])


async def migrate() -> dict[str, Any]:
    """The deployment's one-off task: every worker calls it, one process runs it."""
    append(log, event="start")
    await anyio.sleep(0.5)
    append(log, event="end")
    return {"schema": 3}


migration = once(migrate, across=backend, name=config["name"])


@asynccontextmanager
async def close_backend(app: FastAPI) -> AsyncIterator[None]:
    yield
    await backend.aclose()


app = FastAPI(lifespan=once_lifespan(migration, lifespan=close_backend))


@app.get("/")
async def index(schema: Annotated[dict[str, Any], Depends(migration)]) -> dict[str, Any]:
    return {"pid": os.getpid(), "schema": schema}
