"""The Redis store on a real redis-server: the store contract, and what is Redis's own."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from backend_servers import RedisServer, require
from store_contract import StoreContract, StoreKit

require("redis.asyncio")
from fastapi_once.backends._redis_store import RedisStore  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio is asyncio-only."""
    return "asyncio"


class TestRedisStore(StoreContract):
    @pytest.fixture
    async def kit(self, redis_server: RedisServer) -> AsyncIterator[StoreKit]:
        namespace = "t" + secrets.token_hex(6)
        async with StoreKit.closing(
            lambda: RedisStore(redis_server.url, namespace=namespace)
        ) as kit:
            yield kit
