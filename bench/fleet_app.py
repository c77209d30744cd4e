"""The app each worker of ``bench.fleet`` serves: one route, ``GET /stuff?url=...``, one contender.

``uvicorn bench.fleet_app:app --factory`` builds it from the JSON in ``$BENCH_FLEET``:
``{"contender": ..., "upstream": port, "redis": url, "postgres": dsn, "name": ..., "ttl": s}``
and, for the ``across=`` onces, an optional ``"on_backend_error": "local" | "raise"`` (without it,
once's default).
The route awaits ``fetch(url)``, where ``fetch`` is ``get_stuff`` (one GET from the upstream)
wrapped the way the contender's library would: the route's code is the same for every contender.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI

from fastapi_once import once

from .upstream import get

ENV = "BENCH_FLEET"
Fetch = Callable[[str], Coroutine[Any, Any, str]]
POOL_SIZE = 1000

# contender -> (label, the server it needs: None, "redis" or "postgres")
CONTENDERS: dict[str, tuple[str, str | None]] = {
    "once": ("`once(get_stuff, key=..., ttl=60)`, each process alone", None),
    "once_redis": ('`once(..., across="redis://...")`', "redis"),
    "once_postgres": ('`once(..., across="postgresql://...")`', "postgres"),
    "cashews": ('cashews `@cache(ttl="60s", lock=True)`, Redis', "redis"),
    "aiocache": ("aiocache `@cached(ttl=60, cache=Cache.REDIS, pool_max_size=1000)`", "redis"),
    "aiocache_stampede": (
        "aiocache `@cached_stampede(ttl=60, lease=2, cache=Cache.REDIS, pool_max_size=1000)`",
        "redis",
    ),
}


def upstream_getter(config: dict[str, Any]) -> Fetch:
    """``get_stuff(url)``: one fetch of ``url`` from the upstream, its body as the value."""
    port = config["upstream"]

    async def get_stuff(url: str) -> str:
        status, body = await get(port, url)
        if status != 200:
            raise RuntimeError(f"the upstream answered {status}")
        return body

    return get_stuff


def fetcher(contender: str, config: dict[str, Any]) -> Fetch:
    """``get_stuff`` wrapped as ``contender`` does it.

    Raises:
        TypeError: once() refuses the contender's options (keyed ``across=`` where it is not
            supported).
        ImportError: the contender's library is not installed.
    """
    get_stuff = upstream_getter(config)
    ttl = config["ttl"]
    name = config["name"]
    if contender == "once":
        return once(get_stuff, key=lambda url: url, ttl=ttl, name=name)
    policy: dict[str, Any] = (
        {"on_backend_error": config["on_backend_error"]} if "on_backend_error" in config else {}
    )
    if contender == "once_redis":
        # A plain URL: redis-py's default pool (100 connections, not blocking). Keyed
        # followers hold no connection while they wait, and a process runs at most 8 keyed
        # checks at once, so 100 keys in flight stay well within it.
        return once(
            get_stuff, key=lambda url: url, ttl=ttl, name=name, across=config["redis"], **policy
        )
    if contender == "once_postgres":
        return once(
            get_stuff, key=lambda url: url, ttl=ttl, name=name, across=config["postgres"], **policy
        )
    if contender == "cashews":
        from cashews import cache

        cache.setup(config["redis"])
        cashews_fetch: Fetch = cache(ttl=f"{ttl}s", lock=True, prefix=name)(get_stuff)
        return cashews_fetch
    if contender in ("aiocache", "aiocache_stampede"):
        from aiocache import (  # type: ignore[import-untyped]
            Cache,
            cached,
            cached_stampede,
        )

        redis = urlsplit(config["redis"])
        options: dict[str, Any] = {
            "ttl": ttl,
            "cache": Cache.REDIS,
            "endpoint": redis.hostname,
            "port": redis.port,
            "password": redis.password,
            "namespace": name,
            # As for once_redis: room for every request a worker gets.
            "pool_max_size": POOL_SIZE,
        }
        if contender == "aiocache_stampede":
            aiocache_fetch: Fetch = cached_stampede(lease=2, **options)(get_stuff)
        else:
            aiocache_fetch = cached(**options)(get_stuff)
        return aiocache_fetch
    raise ValueError(f"unknown contender {contender!r}; the contenders are {', '.join(CONTENDERS)}")


def build(config: dict[str, Any]) -> FastAPI:
    """The single-route app of ``config["contender"]``."""
    fetch = fetcher(config["contender"], config)
    made = FastAPI()

    @made.get("/stuff")
    async def stuff(url: str) -> dict[str, str]:
        return {"value": await fetch(url)}

    return made


def app() -> FastAPI:
    """uvicorn's factory: the app that ``$BENCH_FLEET`` describes."""
    return build(json.loads(os.environ[ENV]))
