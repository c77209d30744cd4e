"""PostgresBackend as a store: the store contract on a real PostgreSQL, both lock modes, and
what only this store does (one namespace per table, bounded statements and connections)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from backend_servers import PostgresServer, require
from store_contract import StoreContract, StoreKit

require("asyncpg")

from fastapi_once.backends import PostgresBackend  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio-only


@pytest.fixture(params=["session", "transaction"])
def lock(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestPostgresStore(StoreContract):
    @pytest.fixture
    async def kit(self, postgres_server: PostgresServer, lock: str) -> AsyncIterator[StoreKit]:
        table = "t" + secrets.token_hex(6)
        async with StoreKit.closing(
            lambda: PostgresBackend(postgres_server.dsn, table=table, lock=lock),  # type: ignore[arg-type]
            leases_expire=False,  # an advisory lock ends with its session, not by itself
        ) as kit:
            yield kit
