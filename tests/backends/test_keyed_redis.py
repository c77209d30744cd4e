"""RedisBackend's keyed records in one process: unreachable Redis, and the listener's end."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import anyio
import pytest
from backend_servers import RedisServer, free_port, require

from fastapi_once import once
from fastapi_once.backends import BackendError

redis_asyncio = require("redis.asyncio")
from fastapi_once.backends import RedisBackend  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio is asyncio-only."""
    return "asyncio"


def fetcher() -> Callable[[str], Awaitable[str]]:
    """A new function each time: once(fn) is one once per function."""

    async def get_stuff(url: str) -> str:
        return url

    return get_stuff


async def test_a_keyed_miss_with_redis_unreachable_fails_at_once_without_the_password() -> None:
    """Unreachable at the first contact: BackendError now (not a wait_timeout of retries)."""
    backend = RedisBackend(f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", lease=0.5)
    name = "t.redis.down." + secrets.token_hex(4)
    stuff = once(fetcher(), key=lambda url: url, ttl=60, across=backend, name=name)
    with anyio.fail_after(10), pytest.raises(BackendError) as info:
        await stuff("/a")
    assert "hunter2secret" not in str(info.value)
    assert "reading the record" in str(info.value)
    await backend.aclose()


async def test_aclose_stops_the_reset_listener_and_a_later_call_starts_it_again(
    redis_server: RedisServer,
) -> None:
    """The listener of keyed resets is one task per loop: aclose ends it, the next call
    restarts it, and values are served throughout."""
    backend = RedisBackend(redis_server.url, namespace="t" + secrets.token_hex(6))
    name = "t.redis.listener." + secrets.token_hex(4)
    stuff = once(fetcher(), key=lambda url: url, ttl=60, across=backend, name=name)
    loop = asyncio.get_running_loop()
    assert await stuff("/a") == "/a"
    assert loop in backend._listeners
    await backend.aclose()
    assert loop not in backend._listeners
    assert await stuff("/b") == "/b"
    assert loop in backend._listeners
    await backend.aclose()


async def test_a_message_on_the_reset_channel_that_is_not_a_reset_is_ignored(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone else's message on <namespace>:k:resets is logged and skipped; the listener
    goes on, so a real reset afterwards still makes this process forget the key."""
    from timekeeping import wait_until

    namespace = "t" + secrets.token_hex(6)
    name = "t.redis.garbage." + secrets.token_hex(4)
    runs: list[str] = []

    async def fetch_here(url: str) -> int:
        runs.append(url)
        return len(runs)

    mine, theirs = (RedisBackend(redis_server.url, namespace=namespace) for _ in range(2))
    here = once(fetch_here, key=lambda u: u, ttl=60, across=mine, name=name)
    there = once(fetcher(), key=lambda u: u, ttl=60, across=theirs, name=name)
    assert await here("/a") == 1
    side = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        await side.publish(f"{namespace}:k:resets", "not json")
        await side.publish(f"{namespace}:k:resets", '{"name": "x"}')
    finally:
        await side.aclose()
    await wait_until(lambda: caplog.text.count("not one of ours") == 2)
    assert await here("/a") == 1  # still held
    await there.reset("/a")

    async def forgotten() -> bool:
        return await here("/a") == 2

    await wait_until(forgotten)
    await mine.aclose()
    await theirs.aclose()
