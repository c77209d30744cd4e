"""The example service: every kind of once, the routes that use them, and the app.

- ``database``: a generator ``def``; a shared resource whose code after ``yield`` closes it.
- ``http_client``: an async generator; a shared ``httpx.AsyncClient``, closed after ``yield``.
- ``schema``: the once-per-deployment migration (``fastapi_once.alembic.upgrade``: Alembic's
  ``upgrade`` to the heads of ``migrations/``, two revisions), warmed by ``once_lifespan`` (and on
  first use); ``across=`` a backend (see :mod:`example_app.deployment`), so however many worker
  processes start, one of them migrates the shared database and the others wait for it. Each run
  of the upgrade is recorded in the ``migrations_log`` table, which ``GET /migrations`` lists.
- ``sentiment_model``: a slow ``async def`` load, paid once however many requests wait for it.
- ``get_stuff``: keyed by ``url``; one fetch per distinct URL, the last 64 kept.

Each once's function counts its runs in :data:`setups` (keyed fetches in :data:`fetches`), which
``GET /stats`` reports for the process that answers (``GET /worker`` adds its pid): under any burst
of requests each count stays at one, and ``schema`` runs in one process only.

For ``python -m example_app`` to tell the requests that waited for a setup from those served warm,
each response says which process answered and when the app received the request
(:class:`StampResponses`), and ``GET /worker`` says when each setup's value was ready
(:data:`ready_at`, :data:`fetched_at`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import sqlalchemy as sa
from alembic.config import Config
from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_once import Once, once, once_lifespan, readiness_router
from fastapi_once.alembic import upgrade

from . import deployment
from .upstream import upstream

#: The Alembic scripts of the schema: a new revision there runs the migration once more.
MIGRATIONS = Path(__file__).with_name("migrations")

#: How long loading the model takes, in seconds.
MODEL_LOAD_SECONDS = 0.2

#: How many fetched URLs ``get_stuff`` keeps (least recently used go first).
STUFF_CACHE_SIZE = 64

#: How many times each unkeyed once's function ran in this process.
setups: Counter[str] = Counter()

#: How many times ``get_stuff`` fetched each URL in this process.
fetches: Counter[str] = Counter()

#: When the setups that the burst's routes need (``sentiment_model``, ``http_client``) were last
#: made in this process, in seconds of ``time.time()``.
ready_at: dict[str, float] = {}

#: When ``get_stuff`` last fetched each URL in this process, in seconds of ``time.time()``.
fetched_at: dict[str, float] = {}


def reset_stats() -> None:
    """Zero :data:`setups` and :data:`fetches`; forget :data:`ready_at` and :data:`fetched_at`."""
    setups.clear()
    fetches.clear()
    ready_at.clear()
    fetched_at.clear()


# --- the onces ------------------------------------------------------------------------------------


# Without $EXAMPLE_DB: a database file of this process's own, made at first use. Guarded by
# _scratch_lock; its directory is removed at exit.
_scratch: str | None = None
_scratch_lock = threading.Lock()


def database_path() -> str:
    """The database file: ``$EXAMPLE_DB`` (worker processes that share a database must set it),
    otherwise a file in a temporary directory of this process's own, removed at exit."""
    global _scratch
    path = os.environ.get("EXAMPLE_DB")
    if path:
        return path
    with _scratch_lock:
        if _scratch is None:
            directory = tempfile.mkdtemp(prefix="example_app-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            _scratch = os.path.join(directory, "example.db")
        return _scratch


@once
def database() -> Iterator[sqlite3.Connection]:
    """Open the process's one SQLite connection to :func:`database_path`; close it at shutdown.

    A generator ``def`` runs in a worker thread, hence ``check_same_thread=False``.
    """
    setups["database"] += 1
    connection = sqlite3.connect(database_path(), check_same_thread=False)
    try:
        yield connection
    finally:
        connection.close()


Database = Annotated[sqlite3.Connection, Depends(database)]


def database_file(db: sqlite3.Connection) -> str:
    """Return the path of the file behind ``db``'s main database."""
    row = db.execute("PRAGMA database_list").fetchone()
    return str(row[2])


def record_run(connection: sa.Connection, heads: tuple[str, ...]) -> None:
    """Count a run of the upgrade and log it in ``migrations_log`` (``env.py`` calls it after
    the revisions, in the process that runs them)."""
    setups["schema"] += 1
    connection.execute(
        sa.text("INSERT INTO migrations_log (pid, at, head) VALUES (:pid, :at, :head)"),
        {"pid": os.getpid(), "at": time.time(), "head": "+".join(heads)},
    )


def alembic_config() -> Config:
    """The Alembic config of :data:`MIGRATIONS`; ``env.py`` calls :func:`record_run` after each
    upgrade."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["after_upgrade"] = record_run
    return config


#: Migrate the database to the head revisions once per deployment: every process calls it at
#: startup (or on first use if mounted); one process runs it, the others wait and get the heads.
#: ``url=`` is read at each run, so ``$EXAMPLE_DB`` may be set after import.
schema = upgrade(
    alembic_config(),
    url=lambda: f"sqlite:///{database_path()}",
    across=deployment.backend,
    name="example_app.service.schema",
)


@once
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    """Open the process's one HTTP client to the upstream; close it at shutdown."""
    setups["http_client"] += 1
    # The upstream runs in this process; for a real one, pass base_url="https://..." instead.
    transport = httpx.ASGITransport(app=upstream)
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as client:
        ready_at["http_client"] = time.time()
        yield client


@dataclass(frozen=True)
class SentimentModel:
    """A toy sentiment model: a word list with weights."""

    weights: dict[str, float]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def predict(self, text: str) -> float:
        """Return a score in [-1, 1]: below zero is negative, above is positive."""
        words = text.lower().split()
        total = sum(self.weights.get(word, 0.0) for word in words)
        return max(-1.0, min(1.0, total / max(len(words), 1) * 2))


@once
async def sentiment_model() -> SentimentModel:
    """Load the model: slow, so every request that arrives meanwhile waits for this one load."""
    setups["sentiment_model"] += 1
    await anyio.sleep(MODEL_LOAD_SECONDS)
    model = SentimentModel({"good": 1.0, "great": 1.0, "love": 1.0, "bad": -1.0, "awful": -1.0})
    ready_at["sentiment_model"] = time.time()
    return model


@once(key=lambda url: url, maxsize=STUFF_CACHE_SIZE)
async def get_stuff(
    url: Annotated[str, Query(pattern=r"^/", description="A path on the upstream")],
    client: Annotated[httpx.AsyncClient, Depends(http_client)],
) -> dict[str, Any]:
    """Fetch ``url`` from the upstream once; later requests for the same ``url`` share the result.

    A failed fetch is not kept: the next request for that ``url`` tries again.
    """
    fetches[url] += 1
    fetch = sum(fetches.values())
    response = await client.get(url)
    if response.status_code == 404:
        raise HTTPException(status_code=404, detail=f"the upstream has nothing at {url}")
    response.raise_for_status()
    fetched_at[url] = time.time()
    return {"url": url, "fetch": fetch, "data": response.json()}


#: The onces the app makes before it serves. A host app that mounts this one lists them in its own
#: ``once_lifespan``; without that, they are made on first use.
STARTUP: tuple[Once[..., Any], ...] = (database, schema)


# --- the app --------------------------------------------------------------------------------------


class StampResponses:
    """ASGI middleware: every HTTP response says which process answered (``x-worker``, its pid)
    and when the app received the request (``x-received-at``, seconds of ``time.time()``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = f"{time.time():.6f}".encode()

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                stamps = [(b"x-worker", str(os.getpid()).encode()), (b"x-received-at", received)]
                message = {**message, "headers": [*message.get("headers", ()), *stamps]}
            await send(message)

        await self.app(scope, receive, stamped)


app = FastAPI(title="fastapi_once example", lifespan=once_lifespan(*STARTUP))
app.add_middleware(StampResponses)
app.include_router(readiness_router(*STARTUP, path="/ready"))


class NoteIn(BaseModel):
    """A note to add."""

    text: str


class Note(NoteIn):
    """A stored note."""

    id: int


class Migration(BaseModel):
    """One run of the upgrade, from ``migrations_log``: the process, when, the head it reached."""

    pid: int
    at: float
    head: str


class Migrations(BaseModel):
    """The head revisions the processes share, and every run of the upgrade in this database."""

    heads: list[str]
    runs: list[Migration]


class Prediction(BaseModel):
    """What the model says about a text."""

    text: str
    score: float
    model: str


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Answer as soon as the app serves; uses no once."""
    return {"status": "ok"}


@app.get("/predict")
async def predict(
    text: str, model: Annotated[SentimentModel, Depends(sentiment_model)]
) -> Prediction:
    """Score ``text`` with the shared model."""
    return Prediction(text=text, score=model.predict(text), model=model.id)


@app.get("/stuff")
async def stuff(item: Annotated[dict[str, Any], Depends(get_stuff)]) -> dict[str, Any]:
    """Return the upstream's answer for ``?url=``, fetched once per distinct URL."""
    return item


# Routes that need the tables depend on ``schema`` too, so they also work when this app is mounted
# under another one, whose lifespan does not run this app's startup. Once made, it costs nothing.
# SQLite calls are short here, so they run on the event loop.


@app.get("/notes", dependencies=[Depends(schema)])
async def list_notes(db: Database) -> list[Note]:
    """List the notes."""
    rows = db.execute("SELECT id, text FROM notes ORDER BY id").fetchall()
    return [Note(id=row[0], text=row[1]) for row in rows]


@app.post("/notes", status_code=201, dependencies=[Depends(schema)])
async def add_note(note: NoteIn, db: Database) -> Note:
    """Add a note."""
    with db:
        cursor = db.execute("INSERT INTO notes (text) VALUES (?)", (note.text,))
    assert cursor.lastrowid is not None
    return Note(id=cursor.lastrowid, text=note.text)


@app.get("/stats")
async def stats() -> dict[str, dict[str, int]]:
    """Say how many times each setup ran in this process, and each URL was fetched."""
    return {"setups": dict(setups), "fetches": dict(fetches)}


@app.get("/migrations")
async def migrations(db: Database, heads: Annotated[list[str], Depends(schema)]) -> Migrations:
    """List every run of the upgrade recorded in the database: one per deployment."""
    rows = db.execute("SELECT pid, at, head FROM migrations_log ORDER BY rowid").fetchall()
    runs = [Migration(pid=pid, at=at, head=head) for pid, at, head in rows]
    return Migrations(heads=heads, runs=runs)


@app.get("/worker")
async def worker() -> dict[str, Any]:
    """Say which process answered, its :func:`stats`, and when each setup's value was ready."""
    return {
        "pid": os.getpid(),
        **await stats(),
        "ready_at": dict(ready_at),
        "fetched_at": dict(fetched_at),
    }
