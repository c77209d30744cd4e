"""Where features meet: lifespan shutdown with refresh, ttl and readiness. Each test is bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import httpx
import pytest
from fastapi import FastAPI
from timekeeping import FakeClock, wait_until

from fastapi_once import once, once_lifespan, readiness_router

pytestmark = pytest.mark.anyio


async def test_lifespan_shutdown_mid_refresh_cleans_both_exactly_once(clock: FakeClock) -> None:
    closed: list[int] = []
    release = anyio.Event()
    made = 0

    @once(refresh=5, ttl=100)
    async def val() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        if n == 2:
            await release.wait()
        yield n
        await anyio.sleep(0.01)
        closed.append(n)

    app = FastAPI(lifespan=once_lifespan(val, shutdown_timeout=3))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, app.router.lifespan_context(app):
            assert await val() == 1
            clock.advance(6)
            assert await val() == 1
            tg.start_soon(_later, release)
    assert sorted(closed) == [1, 2]


async def _later(event: anyio.Event) -> None:
    await anyio.sleep(0.05)
    event.set()


async def test_lifespan_shutdown_waits_for_slow_cleanup_of_ttl_retired_value() -> None:
    closed: list[int] = []
    made = 0

    @once(ttl=0.05)
    async def val() -> AsyncIterator[int]:
        nonlocal made
        made += 1
        n = made
        yield n
        await anyio.sleep(0.3)
        closed.append(n)

    app = FastAPI(lifespan=once_lifespan(shutdown_timeout=3))
    with anyio.fail_after(5):
        async with app.router.lifespan_context(app):
            await val()
            await anyio.sleep(0.1)  # retired by ttl; its slow cleanup is running
        assert closed == [1]


async def test_readiness_503_while_expired_value_is_refreshing(clock: FakeClock) -> None:
    gate = anyio.Event()
    made = 0

    @once(refresh=5, ttl=10)
    async def val() -> int:
        nonlocal made
        made += 1
        if made == 2:
            await gate.wait()
        return made

    app = FastAPI()
    app.include_router(readiness_router(val))
    app.include_router(readiness_router(val, path="/ready/strict", warm=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with anyio.fail_after(5):
            assert (await client.get("/ready")).status_code == 503  # kicks
            await wait_until(lambda: val.status().state == "ready")
            assert (await client.get("/ready")).status_code == 200
            clock.advance(6)
            assert await val() == 1
            await anyio.sleep(0.01)  # the refresh is under way
            assert (await client.get("/ready")).status_code == 200  # refreshing: served
            clock.advance(5)
            r = await client.get("/ready/strict")
            assert r.status_code == 503, r.json()  # expired: nothing served right now
            r = await client.get("/ready")  # a warming probe: renewing after a success
            assert r.json()["onces"][val.name] == {"state": "running", "renewing": True}
            assert made == 2  # the kick did not start a second run
            gate.set()
            await wait_until(lambda: val.status().state == "ready")
            assert (await client.get("/ready")).status_code == 200


async def test_cold_burst_with_kicks_runs_fn_once() -> None:
    from fastapi_once._readiness import kick

    runs = 0

    @once
    async def val() -> int:
        nonlocal runs
        runs += 1
        await anyio.sleep(0.02)
        return runs

    got: list[int] = []

    async def caller() -> None:
        got.append(await val())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(caller)
                if i % 10 == 0:
                    kick(val, None)
                await anyio.lowlevel.checkpoint()
    assert runs == 1
    assert set(got) == {1}


async def test_keyed_reset_from_inside_fn_same_key_cycles_other_key_waits() -> None:
    from fastapi_once import OnceCycleError

    @once(key=lambda k: k)
    async def val(k: int) -> int:
        if k == 1:
            await val.reset(1)
        if k == 2:
            await val.reset(3)
        return k

    with anyio.fail_after(5):
        with pytest.raises(OnceCycleError):
            await val(1)
        assert await val(3) == 3
        assert await val(2) == 2
        assert val.status().size == 1  # 3 was reset by 2's fn
