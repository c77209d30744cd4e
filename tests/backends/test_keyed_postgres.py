"""PostgresBackend's keyed records in one process: connections reused, and replaced when broken."""

from __future__ import annotations

import secrets

import pytest
from backend_servers import PostgresServer, require

asyncpg = require("asyncpg")
from fastapi_once import once  # noqa: E402
from fastapi_once.backends import PostgresBackend  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg is asyncio-only."""
    return "asyncio"


async def sessions(dsn: str) -> int:
    """How many sessions the server has started in its database so far."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            await conn.fetchval(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def test_keyed_misses_reuse_a_connection_instead_of_opening_one_each(
    postgres_server: PostgresServer,
) -> None:
    """Twenty misses one after another: a handful of sessions (the listener, one reused
    connection), not twenty."""
    backend = PostgresBackend(postgres_server.dsn, table="t" + secrets.token_hex(6))

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=backend, name="t.pg.reuse")
    await stuff("warm-up")
    before = await sessions(postgres_server.dsn)
    for i in range(20):
        assert await stuff(f"/{i}") == f"/{i}"
    assert await sessions(postgres_server.dsn) - before <= 5  # our own counting sessions: 2
    await backend.aclose()


async def test_an_idle_connection_broken_by_a_server_restart_is_replaced(
    private_postgres: PostgresServer,
) -> None:
    """The server restarts between two misses: the next miss connects anew and succeeds."""
    backend = PostgresBackend(private_postgres.dsn, table="t" + secrets.token_hex(6))

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=backend, name="t.pg.restart")
    assert await stuff("/a") == "/a"
    private_postgres.restart()
    assert await stuff("/b") == "/b"
    await backend.aclose()


async def test_a_keyed_once_takes_the_backend_as_a_url(postgres_server: PostgresServer) -> None:
    """across="postgresql://..." builds the backend at first use, keyed as with an object."""

    async def get_stuff(url: str) -> dict[str, str]:
        return {"url": url}

    name = "t.pg.url." + secrets.token_hex(4)
    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=postgres_server.dsn, name=name)
    assert await stuff("/a") == {"url": "/a"}
    assert await stuff("/b") == {"url": "/b"}
