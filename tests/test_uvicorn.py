"""Under a real uvicorn server on 127.0.0.1, a concurrent burst makes a once's value once."""

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI
from serving import fire, running

from fastapi_once import once, once_lifespan

BURST = 100


def test_burst_under_uvicorn_runs_the_setup_once() -> None:
    """100 concurrent cold requests all get 200 and the one value that one setup made."""
    calls: list[str] = []

    async def load() -> str:
        value = uuid.uuid4().hex
        calls.append(value)
        await anyio.sleep(0.2)
        return value

    app = FastAPI()

    @app.get("/value")
    async def value(loaded: Annotated[str, Depends(once(load))]) -> dict[str, str]:
        return {"value": loaded}

    with running(app) as base_url:
        responses = fire(base_url, ["/value"] * BURST)
    assert len(calls) == 1
    assert [r.status_code for r in responses] == [200] * BURST
    assert {r.json()["value"] for r in responses} == set(calls)


def test_keyed_burst_under_uvicorn_runs_the_setup_once_per_key() -> None:
    """100 concurrent cold requests over 5 keys make each key's value once and share it."""
    calls: list[str] = []

    async def fetch(name: str) -> str:
        calls.append(name)
        await anyio.sleep(0.1)
        return f"{name}:{uuid.uuid4().hex}"

    app = FastAPI()

    @app.get("/value")
    async def value(
        fetched: Annotated[str, Depends(once(fetch, key=lambda name: name))],
    ) -> dict[str, str]:
        return {"value": fetched}

    names = [f"k{i % 5}" for i in range(BURST)]
    with running(app) as base_url:
        responses = fire(base_url, [f"/value?name={name}" for name in names])
    assert sorted(calls) == sorted(set(names))
    assert [r.status_code for r in responses] == [200] * BURST
    per_key: dict[str, set[str]] = {}
    for r in responses:
        per_key.setdefault(r.json()["value"].split(":")[0], set()).add(r.json()["value"])
    assert {key: len(values) for key, values in per_key.items()} == dict.fromkeys(set(names), 1)


def test_uvicorn_shutdown_runs_the_cleanup() -> None:
    """Stopping the server runs once_lifespan's shutdown: the generator's cleanup runs once."""
    events: list[str] = []

    async def resource() -> AsyncIterator[dict[str, Any]]:
        events.append("open")
        yield {"open": True}
        events.append("close")

    app = FastAPI(lifespan=once_lifespan(resource))

    @app.get("/resource")
    async def get_resource(
        made: Annotated[dict[str, Any], Depends(once(resource))],
    ) -> dict[str, Any]:
        return made

    with running(app) as base_url:
        assert events == ["open"]
        responses = fire(base_url, ["/resource"] * 50)
        assert events == ["open"]
    assert [r.json() for r in responses] == [{"open": True}] * 50
    assert events == ["open", "close"]
