"""The readiness probe: 200 when the given onces are ready, 503 with Retry-After until then."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from serving import running
from timekeeping import FakeClock, wait_until

from fastapi_once import once, once_lifespan, readiness_router

pytestmark = pytest.mark.anyio


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_ready_only_when_every_listed_once_has_a_value() -> None:
    """503 with Retry-After and each state while warming; 200 once all are ready."""
    gate = anyio.Event()

    @once(name="db")
    async def get_db() -> str:
        await gate.wait()
        return "db"

    @once(name="cache")
    async def get_cache() -> str:
        return "cache"

    app = FastAPI()
    app.include_router(readiness_router(get_db, get_cache, retry_after=3))
    async with client(app) as http:
        first = await http.get("/ready")
        assert first.status_code == 503
        assert first.headers["Retry-After"] == "3"
        assert first.json() == {
            "status": "unavailable",
            "onces": {"db": {"state": "running"}, "cache": {"state": "running"}},
        }
        gate.set()

        async def ready() -> bool:
            return (await http.get("/ready")).status_code == 200

        await wait_until(ready)
        response = await http.get("/ready")
        assert response.json() == {
            "status": "ready",
            "onces": {"db": {"state": "ready"}, "cache": {"state": "ready"}},
        }


async def test_a_failed_once_is_unavailable_and_its_message_is_hidden(clock: FakeClock) -> None:
    """A failure shows as failed; no exception text unless details=True."""

    @once(name="db", cooldown=30)
    async def get_db() -> str:
        raise ConnectionError("postgresql://admin:hunter2@db")

    app = FastAPI()
    app.include_router(readiness_router(get_db))
    app.include_router(readiness_router(get_db, path="/ready/details", details=True))
    async with client(app) as http:
        await http.get("/ready")  # starts the attempt
        await wait_until(lambda: get_db.status().state == "failed")
        response = await http.get("/ready")
        assert response.status_code == 503
        assert "hunter2" not in response.text
        detailed = (await http.get("/ready/details")).json()["onces"]["db"]
        assert detailed["error"] == "ConnectionError"
        assert "hunter2" in detailed["message"]
        assert detailed["attempts"] == 1  # the cooldown holds back further attempts


async def test_without_warm_a_probe_only_reports() -> None:
    """warm=False: the probe does not make a value that is not there."""
    runs = 0

    @once
    async def get_db() -> str:
        nonlocal runs
        runs += 1
        return "db"

    app = FastAPI()
    app.include_router(readiness_router(get_db, warm=False))
    async with client(app) as http:
        assert (await http.get("/ready")).json()["onces"][get_db.name]["state"] == "idle"
        assert (await http.get("/ready")).status_code == 503
        assert runs == 0
        await get_db()
        assert (await http.get("/ready")).status_code == 200


async def test_warmed_onces_are_ready_from_the_first_probe() -> None:
    """With once_lifespan warming them, the first probe answers 200."""

    @once
    async def get_db() -> str:
        return "db"

    app = FastAPI(lifespan=once_lifespan(get_db))
    app.include_router(readiness_router(get_db))
    async with LifespanManager(app) as manager, client(manager.app) as http:
        assert (await http.get("/ready")).status_code == 200


async def test_an_overridden_once_counts_as_ready() -> None:
    """A once replaced by dependency_overrides is not waited for."""

    @once
    async def get_db() -> str:
        return "db"  # pragma: no cover

    app = FastAPI()
    app.include_router(readiness_router(get_db, warm=False))
    app.dependency_overrides[get_db] = lambda: "fake"
    async with client(app) as http:
        assert (await http.get("/ready")).status_code == 200


def test_readiness_needs_unkeyed_onces() -> None:
    """No onces, a keyed once, or a bad retry_after are errors at definition time."""

    @once(key=lambda url: url)
    async def get_stuff(url: str) -> str:
        return url

    async def get_db() -> str:
        return "db"

    with pytest.raises(TypeError, match="needs the onces"):
        readiness_router()
    with pytest.raises(TypeError, match="keyed once"):
        readiness_router(get_stuff)
    with pytest.raises(ValueError, match="retry_after"):
        readiness_router(get_db, retry_after=-1)


def test_readiness_under_a_real_uvicorn_server() -> None:
    """Lazy onces on the probe: 503 with Retry-After until they are made, then 200."""

    @once
    async def load_model() -> str:
        await anyio.sleep(0.3)
        return "model"

    app = FastAPI()
    app.include_router(readiness_router(load_model, path="/readyz"))
    seen: list[tuple[int, str | None]] = []
    with running(app) as base_url:
        deadline = time.monotonic() + 10
        while not seen or seen[-1][0] != 200:
            assert time.monotonic() < deadline, seen
            response = httpx.get(f"{base_url}/readyz")
            seen.append((response.status_code, response.headers.get("Retry-After")))
            time.sleep(0.05)
    assert seen[0] == (503, "5")
    assert seen[-1] == (200, None)
    assert {code for code, _ in seen} == {200, 503}


async def test_the_probe_answers_503_when_the_value_is_past_its_ttl(clock: FakeClock) -> None:
    """No value would be served (past ttl): 503, whatever was made before."""

    @once(ttl=10)
    async def get_token() -> str:
        return "token"

    app = FastAPI()
    app.include_router(readiness_router(get_token, warm=False))
    async with client(app) as http:
        await get_token()
        assert (await http.get("/ready")).status_code == 200
        clock.advance(10)
        response = await http.get("/ready")
        assert response.status_code == 503
        assert response.json()["onces"][get_token.name]["state"] == "idle"
