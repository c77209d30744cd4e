"""The example service: every kind of once, the routes that use them, and the app.

- ``database``: a generator ``def``; a shared resource whose code after ``yield`` closes it.
- ``http_client``: an async generator; a shared ``httpx.AsyncClient``, closed after ``yield``.
- ``schema``: the once-per-deployment migration, warmed by ``once_lifespan`` (and on first use);
  ``across=`` a backend (see :mod:`example_app.deployment`), so however many worker processes
  start, one of them migrates the shared database and the others wait for it. Each real run is
  recorded in the ``migrations_log`` table, which ``GET /migrations`` lists.
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

import os
import sqlite3
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import httpx
from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_once import Once, once, once_lifespan, readiness_router

from . import deployment
from .upstream import upstream

#: The schema's version: a new one is a new deployment task, which runs once more.
SCHEMA_VERSION = 1

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


@once
def database() -> Iterator[sqlite3.Connection]:
    """Open the process's one SQLite connection; close it (and drop its temporary file) at shutdown.

    The file is ``$EXAMPLE_DB`` when set (worker processes that share a database must set it),
    otherwise a file in a fresh temporary directory. A generator ``def`` runs in a worker thread,
    hence ``check_same_thread=False``.
    """
    setups["database"] += 1
    path = os.environ.get("EXAMPLE_DB")
    tmp = None
    if not path:
        tmp = tempfile.TemporaryDirectory(prefix="example_app-")
        path = os.path.join(tmp.name, "example.db")
    connection = sqlite3.connect(path, check_same_thread=False)
    try:
        yield connection
    finally:
        connection.close()
        if tmp is not None:
            tmp.cleanup()


Database = Annotated[sqlite3.Connection, Depends(database)]


def database_file(db: sqlite3.Connection) -> str:
    """Return the path of the file behind ``db``'s main database."""
    row = db.execute("PRAGMA database_list").fetchone()
    return str(row[2])


@once(across=deployment.backend, version=SCHEMA_VERSION)
async def schema(db: Database) -> dict[str, int]:
    """Migrate the database once per deployment; return the schema version and who migrated it.

    Every process calls it at startup (or on first use if mounted); one process runs it, the
    others wait and get its result. Each run is recorded in ``migrations_log``.
    """
    setups["schema"] += 1
    db.executescript(
        f"""
        CREATE TABLE IF NOT EXISTS notes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            text TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS migrations_log (
            pid INTEGER NOT NULL,
            at REAL NOT NULL,
            version INTEGER NOT NULL
        );
        PRAGMA user_version = {SCHEMA_VERSION};
        """
    )
    with db:
        db.execute(
            "INSERT INTO migrations_log (pid, at, version) VALUES (?, ?, ?)",
            (os.getpid(), time.time(), SCHEMA_VERSION),
        )
    return {"version": SCHEMA_VERSION, "pid": os.getpid()}


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
STARTUP: tuple[Once[..., Any], ...] = (schema,)


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
    """One real run of the migration, from ``migrations_log``."""

    pid: int
    at: float
    version: int


class Migrations(BaseModel):
    """The schema version the processes share, and every run of its migration in this database."""

    version: int
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
async def migrations(db: Database, done: Annotated[dict[str, int], Depends(schema)]) -> Migrations:
    """List every run of the migration recorded in the database: one per deployment."""
    rows = db.execute("SELECT pid, at, version FROM migrations_log ORDER BY rowid").fetchall()
    runs = [Migration(pid=pid, at=at, version=version) for pid, at, version in rows]
    return Migrations(version=done["version"], runs=runs)


@app.get("/worker")
async def worker() -> dict[str, Any]:
    """Say which process answered, its :func:`stats`, and when each setup's value was ready."""
    return {
        "pid": os.getpid(),
        **await stats(),
        "ready_at": dict(ready_at),
        "fetched_at": dict(fetched_at),
    }
