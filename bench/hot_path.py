"""Scenario 1: the warm hot path, a FastAPI route whose dependency returns a shared value.

Every contender is a small function that builds an app with one route, ``GET /``, returning the
same JSON. The apps are called directly as ASGI applications (no network), round-robin in the
same event loop, so drift hits every contender alike; throughput is reported as the median over
rounds and as the median of each round's ratio to the baseline's. A second, separately built copy
of the baseline runs as one more contender: its ratio to the baseline shows how finely the
harness resolves a difference on this machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import lru_cache
from typing import Any

from async_lru import alru_cache
from fastapi import Depends, FastAPI, Request
from fastapi_singleton import singleton
from starlette.types import Message

from fastapi_once import once

from .config import Config
from .paired import ratios


class Settings:
    """What the dependency provides: a stand-in for an app's settings object."""

    def __init__(self) -> None:
        self.name = "bench"


class Client:
    """A stand-in for a client made from the settings (the sub-dependency case)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


SETTINGS = Settings()


def nothing() -> FastAPI:
    """A route with no dependency at all: the ceiling."""
    app = FastAPI()

    @app.get("/")
    async def route() -> dict[str, str]:
        return {"name": SETTINGS.name}

    return app


def _app_with(dependency: Callable[..., Any]) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def route(settings: Settings = Depends(dependency)) -> dict[str, str]:
        return {"name": settings.name}

    return app


def baseline() -> FastAPI:
    """The baseline: a plain ``async def`` returning a module-level global."""

    async def get_settings() -> Settings:
        return SETTINGS

    return _app_with(get_settings)


def lru_cache_recipe() -> FastAPI:
    """FastAPI's documented settings recipe: a sync ``def`` under ``@lru_cache``."""

    @lru_cache
    def get_settings() -> Settings:
        return Settings()

    return _app_with(get_settings)


def lifespan_state() -> FastAPI:
    """A value made in the lifespan and read from ``request.state``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"settings": Settings()}

    async def get_settings(request: Request) -> Settings:
        settings: Settings = request.state.settings
        return settings

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    async def route(settings: Settings = Depends(get_settings)) -> dict[str, str]:
        return {"name": settings.name}

    return app


def fastapi_singleton() -> FastAPI:
    """``@singleton`` from fastapi-singleton on an ``async def``."""

    @singleton
    async def get_settings() -> Settings:
        return Settings()

    return _app_with(get_settings)


def alru_cache_recipe() -> FastAPI:
    """``@alru_cache`` from async-lru on an ``async def``."""

    @alru_cache(maxsize=1)
    async def get_settings() -> Settings:
        return Settings()

    return _app_with(get_settings)


def once_plain() -> FastAPI:
    """``@once`` on an ``async def`` with no parameters."""

    @once
    async def get_settings() -> Settings:
        return Settings()

    return _app_with(get_settings)


def once_with_sub_dependency() -> FastAPI:
    """``@once`` on an ``async def`` that takes ``Depends(get_settings)``, a sync ``def``."""

    @lru_cache
    def get_settings() -> Settings:
        return Settings()

    @once
    async def get_client(settings: Settings = Depends(get_settings)) -> Client:
        return Client(settings)

    app = FastAPI()

    @app.get("/")
    async def route(client: Client = Depends(get_client)) -> dict[str, str]:
        return {"name": client.settings.name}

    return app


BASELINE = "baseline"

# id -> (label, app factory), in table order.
CONTENDERS: dict[str, tuple[str, Callable[[], FastAPI]]] = {
    "nothing": ("no dependency", nothing),
    "baseline": ("async def returning a global (baseline)", baseline),
    "baseline_again": ("the baseline again, a second app (control)", baseline),
    "lru_cache": ("@lru_cache def (FastAPI docs recipe)", lru_cache_recipe),
    "lifespan_state": ("lifespan state via request.state", lifespan_state),
    "fastapi_singleton": ("fastapi-singleton @singleton", fastapi_singleton),
    "alru_cache": ("async-lru @alru_cache", alru_cache_recipe),
    "once": ("once", once_plain),
    "once_subdep": ("once with Depends(get_settings)", once_with_sub_dependency),
}

_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 80),
}
_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> Message:
    return _REQUEST


async def _discard(message: Message) -> None:
    pass


class Served:
    """An app with its lifespan entered, callable with a fresh scope per request."""

    def __init__(self, app: FastAPI, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def check(self) -> None:
        """Serve one request and fail unless it answers 200 with the expected body."""
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app({**_SCOPE, "state": dict(self.state)}, _receive, send)
        status = sent[0].get("status")
        body = b"".join(m.get("body", b"") for m in sent[1:])
        if status != 200 or body != b'{"name":"bench"}':
            raise RuntimeError(f"unexpected response {status} {body!r}")

    async def serve(self, requests: int) -> tuple[float, float]:
        """Serve ``requests`` requests one after another; return wall and CPU seconds taken."""
        app, state, scope = self.app, self.state, _SCOPE
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            await app({**scope, "state": dict(state)}, _receive, _discard)
        return time.perf_counter() - start, time.process_time() - start_cpu


async def run(config: Config) -> dict[str, Any]:
    """Measure requests/second of every contender, interleaved round-robin."""
    served: dict[str, Served] = {}
    async with AsyncExitStack() as stack:
        for cid, (_, factory) in CONTENDERS.items():
            # Enter each app's lifespan, as a server would; its state reaches request.state.
            app = factory()
            state = await stack.enter_async_context(app.router.lifespan_context(app))
            served[cid] = Served(app, dict(state or {}))
        for item in served.values():
            await item.check()
            await item.serve(max(config.hot_requests, 10))  # warm-up
        wall: dict[str, list[float]] = {cid: [] for cid in served}
        cpu: dict[str, list[float]] = {cid: [] for cid in served}
        order = list(served)
        for round_ in range(config.hot_rounds):
            # Rotate the order each round so no contender always runs right after another.
            shift = round_ % len(order)
            gc.collect()
            for cid in order[shift:] + order[:shift]:
                seconds, cpu_seconds = await served[cid].serve(config.hot_requests)
                wall[cid].append(config.hot_requests / seconds)
                cpu[cid].append(config.hot_requests / max(cpu_seconds, 1e-9))
    contenders = {}
    for cid in served:
        wall_ratio, cpu_ratio = ratios(wall[cid], wall[BASELINE]), ratios(cpu[cid], cpu[BASELINE])
        contenders[cid] = {
            "label": CONTENDERS[cid][0],
            "rps_median": statistics.median(wall[cid]),
            "us_per_request": 1e6 / statistics.median(wall[cid]),
            "ratio_to_baseline": wall_ratio["median"],
            "ratio_q1": wall_ratio["q1"],
            "ratio_q3": wall_ratio["q3"],
            "cpu_rps_median": statistics.median(cpu[cid]),
            "cpu_ratio_to_baseline": cpu_ratio["median"],
            "cpu_ratio_q1": cpu_ratio["q1"],
            "cpu_ratio_q3": cpu_ratio["q3"],
            "rps_rounds": wall[cid],
            "cpu_rps_rounds": cpu[cid],
        }
    return {
        "baseline": BASELINE,
        "rounds": config.hot_rounds,
        "requests_per_round": config.hot_requests,
        "contenders": contenders,
    }
