"""MySQLBackend (on a real MariaDB server the suite starts): the store contract, and what is
MySQL's own: the URL, the login, the lock session, the tables, the connections."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from backend_servers import MariaDBServer, require
from store_contract import StoreContract, StoreKit

require("asyncmy")

from fastapi_once.backends._mysql import MySQLBackend  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    """asyncmy is asyncio-only."""
    return "asyncio"


@pytest.fixture
def table() -> str:
    return "t" + secrets.token_hex(6)


class TestMySQLStore(StoreContract):
    @pytest.fixture
    async def kit(self, mariadb_server: MariaDBServer) -> AsyncIterator[StoreKit]:
        make = lambda: MySQLBackend(mariadb_server.url, table="contract")  # noqa: E731
        async with StoreKit.closing(make) as kit:
            yield kit
