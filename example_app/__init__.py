"""A small service that shows every use of fastapi_once; ``python -m example_app`` load-tests it.

Run it with ``uvicorn example_app:app``, or mount it::

    host = FastAPI(lifespan=once_lifespan(*example_app.STARTUP))
    host.mount("/example", example_app.app)

Without the host's ``once_lifespan`` it still works: each once is made on first use.

With several worker processes (``uvicorn example_app:app --workers 4``) they must share the
database file, ``$EXAMPLE_DB``. Each worker opens its own connection, HTTP client and model, once;
the schema migration (:data:`~example_app.service.schema`: ``fastapi_once.alembic.upgrade`` over
the Alembic revisions in ``example_app/migrations``) runs once per deployment in total, across
the backend that ``$EXAMPLE_BACKEND_URL`` names (see :mod:`example_app.deployment`).

Why not an ``asyncio.Lock``?
----------------------------
The usual recipe for "load the model once" is a global and a lock::

    _model = None
    _lock = asyncio.Lock()

    async def get_model():
        global _model
        async with _lock:
            if _model is None:
                _model = await load_model()
        return _model

It makes one model under concurrent requests, but:

- the load runs in the first request's task: if that client disconnects, the load is cancelled
  and the next waiter starts it again from scratch;
- every request takes the lock, even long after the model is loaded;
- the lock and the global belong to the first event loop that used them, so a second loop (a new
  ``TestClient``, the next test) gets ``RuntimeError: ... bound to a different event loop`` or a
  client whose connections belong to a closed loop;
- nothing releases the model or its connections at shutdown, and a per-URL cache needs a dict of
  locks that grows with every URL;
- it does not run under trio.

With ``once`` the same dependency is::

    @once
    async def get_model():
        return await load_model()

The load runs in a task the library owns, so no caller's cancellation stops it; once made, a
call is a dictionary look-up; values are kept per event loop; an (async) generator's code after
``yield`` is its cleanup, which ``once_lifespan`` runs at shutdown; ``key=`` keeps one value per
request parameter with an LRU bound (see :func:`~example_app.service.get_stuff`).
"""

from .service import (
    STARTUP,
    app,
    database,
    fetched_at,
    fetches,
    get_stuff,
    http_client,
    ready_at,
    reset_stats,
    schema,
    sentiment_model,
    setups,
)

__all__ = [
    "STARTUP",
    "app",
    "database",
    "fetched_at",
    "fetches",
    "get_stuff",
    "http_client",
    "ready_at",
    "reset_stats",
    "schema",
    "sentiment_model",
    "setups",
]
