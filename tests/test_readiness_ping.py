"""The readiness probe's ping= checks, and a probe that does not flap when a value expires."""

from __future__ import annotations

import threading

import anyio
import httpx
import pytest
from fastapi import FastAPI
from timekeeping import FakeClock, wait_until

from fastapi_once import once, readiness_router

pytestmark = pytest.mark.anyio


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_a_failing_ping_turns_the_probe_to_503_and_back(clock: FakeClock) -> None:
    """A ping that fails answers 503 naming the once; its message only with details."""
    broken = False
    pings = 0

    async def check(pool: str) -> None:
        nonlocal pings
        pings += 1
        assert pool == "pool"
        if broken:
            raise ConnectionError("postgresql://admin:hunter2@db is gone")

    @once(name="db", ping=check)
    async def get_db() -> str:
        return "pool"

    app = FastAPI()
    app.include_router(readiness_router(get_db, ping_every=10))
    app.include_router(readiness_router(get_db, path="/details", details=True, ping_every=10))
    async with client(app) as http:
        await get_db()
        ok = await http.get("/ready")
        assert ok.status_code == 200
        assert ok.json()["onces"] == {"db": {"state": "ready", "ping": "ok"}}
        broken = True
        assert (await http.get("/ready")).status_code == 200  # the last ping is still fresh
        clock.advance(10)
        failed = await http.get("/ready")
        assert failed.status_code == 503
        assert failed.headers["Retry-After"] == "5"
        assert failed.json() == {
            "status": "unavailable",
            "onces": {"db": {"state": "ready", "ping": "failed"}},
        }
        assert "hunter2" not in failed.text
        clock.advance(10)
        detailed = (await http.get("/details")).json()["onces"]["db"]
        assert detailed["ping_error"] == "ConnectionError"
        assert "hunter2" in detailed["ping_message"]
        broken = False
        clock.advance(10)
        assert (await http.get("/ready")).status_code == 200
        assert get_db.status().state == "ready"  # a failed ping does not throw the value away
    assert pings == 4  # each router keeps its own pings


async def test_a_hanging_ping_fails_after_ping_timeout() -> None:
    """A ping that does not answer within ping_timeout counts as failed (TimeoutError)."""

    async def check(pool: str) -> None:
        await anyio.sleep_forever()

    @once(name="db", ping=check)
    async def get_db() -> str:
        return "pool"

    app = FastAPI()
    app.include_router(readiness_router(get_db, details=True, ping_timeout=0.05))
    async with client(app) as http:
        await get_db()
        with anyio.fail_after(10):
            response = await http.get("/ready")
    assert response.status_code == 503
    entry = response.json()["onces"]["db"]
    assert (entry["ping"], entry["ping_error"]) == ("failed", "TimeoutError")


async def test_a_sync_ping_runs_in_a_worker_thread_and_false_fails() -> None:
    """A def check runs off the event loop's thread; returning False is a failure."""
    threads: list[int] = []

    def check(pool: str) -> bool:
        threads.append(threading.get_ident())
        return False

    @once(name="db", ping=check)
    async def get_db() -> str:
        return "pool"

    app = FastAPI()
    app.include_router(readiness_router(get_db, details=True))
    async with client(app) as http:
        await get_db()
        response = await http.get("/ready")
    assert response.status_code == 503
    assert response.json()["onces"]["db"]["ping_error"] == "returned False"
    assert threads
    assert threads[0] != threading.get_ident()


async def test_a_probe_storm_shares_one_ping() -> None:
    """Concurrent probes wait for the ping in flight instead of starting their own."""
    gate = anyio.Event()
    pings = 0

    async def check(pool: str) -> None:
        nonlocal pings
        pings += 1
        await gate.wait()

    @once(name="db", ping=check)
    async def get_db() -> str:
        return "pool"

    app = FastAPI()
    app.include_router(readiness_router(get_db))
    codes: list[int] = []
    async with client(app) as http:
        await get_db()

        async def probe() -> None:
            codes.append((await http.get("/ready")).status_code)

        async with anyio.create_task_group() as group:
            for _ in range(50):
                group.start_soon(probe)
            await wait_until(lambda: pings == 1)
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert codes == [200] * 50
    assert pings == 1


async def test_a_once_without_a_value_is_not_pinged() -> None:
    """The ping runs only on a value: while the first attempt runs, 503 and no ping."""
    gate = anyio.Event()

    def check(pool: str) -> None:
        raise AssertionError("pinged without a value")  # pragma: no cover

    @once(name="db", ping=check)
    async def get_db() -> str:
        await gate.wait()
        return "pool"

    app = FastAPI()
    app.include_router(readiness_router(get_db))
    async with client(app) as http:
        response = await http.get("/ready")
        assert response.status_code == 503
        assert response.json()["onces"]["db"] == {"state": "running"}
        gate.set()
        await wait_until(lambda: get_db.status().state == "ready")


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "not-warm"])
async def test_a_probe_refreshes_a_due_value_so_an_idle_pod_never_expires(
    clock: FakeClock, warm: bool
) -> None:
    """With refresh=, probes alone keep the value fresh: 200 on every probe, no expiry; also
    with warm=False, which makes nothing but still starts a refresh due before the ttl."""
    runs = 0

    @once(name="token", refresh=5, ttl=10)
    async def get_token() -> int:
        nonlocal runs
        runs += 1
        return runs

    app = FastAPI()
    app.include_router(readiness_router(get_token, warm=warm))
    async with client(app) as http:
        assert (await http.get("/ready")).status_code == 503  # cold
        if warm:  # warming
            await wait_until(lambda: get_token.status().state == "ready")
        else:  # nothing made until a call
            assert runs == 0
            assert await get_token() == 1
        for _ in range(4):
            clock.advance(6)  # due for refresh, not expired
            assert (await http.get("/ready")).status_code == 200
            await wait_until(lambda: get_token.status().state == "ready")
    assert runs == 5


@pytest.mark.parametrize("stale_if_error", [None, 30], ids=["expired", "kept-stale"])
async def test_without_warm_a_probe_makes_nothing_past_the_ttl(
    clock: FakeClock, stale_if_error: float | None
) -> None:
    """warm=False: past its ttl (no probe came in time) a value is not renewed by a probe, also
    while stale_if_error= keeps it: idle, 503, nothing made."""
    runs = 0
    options = {} if stale_if_error is None else {"stale_if_error": stale_if_error}

    @once(name="token", refresh=5, ttl=10, **options)  # type: ignore[call-overload]
    async def get_token() -> int:
        nonlocal runs
        runs += 1
        return runs

    app = FastAPI()
    app.include_router(readiness_router(get_token, warm=False))
    async with client(app) as http:
        assert await get_token() == 1
        clock.advance(10)
        response = await http.get("/ready")
        assert response.status_code == 503
        assert response.json()["onces"]["token"]["state"] == "idle"
        await anyio.sleep(0.01)  # an attempt started by the probe would run now
    assert runs == 1


async def test_an_expired_value_being_renewed_does_not_flap_the_probe(clock: FakeClock) -> None:
    """ttl= without refresh=: past expiry the probe renews it and stays 200 (renewing, unpinged)."""
    gate = anyio.Event()
    runs = 0

    pinged: list[int] = []

    @once(name="token", ttl=10, ping=pinged.append)
    async def get_token() -> int:
        nonlocal runs
        runs += 1
        if runs == 2:
            await gate.wait()
        return runs

    app = FastAPI()
    app.include_router(readiness_router(get_token))
    async with client(app) as http:
        assert await get_token() == 1
        clock.advance(10)
        response = await http.get("/ready")
        assert response.status_code == 200
        assert response.json()["onces"]["token"] == {"state": "running", "renewing": True}
        gate.set()
        await wait_until(lambda: get_token.status().state == "ready")
        ready = (await http.get("/ready")).json()["onces"]["token"]
        assert ready == {"state": "ready", "ping": "ok"}
    assert pinged == [2]  # nothing to ping while renewing; then the new value


async def test_a_renewal_that_fails_is_unavailable(clock: FakeClock) -> None:
    """The renewal of an expired value fails: failed, 503 (it no longer counts as renewing)."""
    runs = 0

    @once(name="token", ttl=10)
    async def get_token() -> int:
        nonlocal runs
        runs += 1
        if runs == 2:
            raise ConnectionError
        return runs

    app = FastAPI()
    app.include_router(readiness_router(get_token))
    async with client(app) as http:
        assert await get_token() == 1
        clock.advance(10)
        await http.get("/ready")  # starts the renewal
        await wait_until(lambda: get_token.status().state != "running")
        response = await http.get("/ready")  # starts attempt 3, which succeeds
        assert response.status_code == 503
        assert response.json()["onces"]["token"] == {"state": "running"}


def test_ping_needs_an_unkeyed_once_and_a_callable() -> None:
    """ping= on a keyed once, or not a function, and bad ping intervals are errors."""

    async def get_stuff(url: str) -> str:
        return url  # pragma: no cover

    async def get_db() -> str:
        return "db"  # pragma: no cover

    with pytest.raises(TypeError, match="ping= takes a function"):
        once(get_stuff, key=lambda url: url, ping=lambda value: None)
    with pytest.raises(TypeError, match="ping= takes a function"):
        once(get_db, ping="SELECT 1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ping_timeout"):
        readiness_router(get_db, ping_timeout=0)
    with pytest.raises(ValueError, match="ping_every"):
        readiness_router(get_db, ping_every=-1)
