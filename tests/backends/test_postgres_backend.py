"""PostgresBackend's own behaviour: its table, its locks, its errors."""

from __future__ import annotations

import secrets

import anyio
import pytest
from backend_servers import PostgresServer, free_port, require

from fastapi_once.backends import BackendError

asyncpg = require("asyncpg")
from fastapi_once.backends import PostgresBackend  # noqa: E402
from fastapi_once.backends._postgres import _lock_key  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg is asyncio-only."""
    return "asyncio"


@pytest.fixture
def table() -> str:
    return "t" + secrets.token_hex(6)


async def answer() -> int:
    return 42


async def test_the_marker_table_is_created_with_the_result_and_who_recorded_it(
    postgres_server: PostgresServer, table: str
) -> None:
    """The first use creates the table; the row holds the JSON text and the leader's pid."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    assert await backend.run_once("tests.pg.job", answer, ttl=60) == 42
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        row = await conn.fetchrow(
            f"SELECT result, expires_at > now() AS fresh, done_by FROM {table} WHERE name = $1",
            "tests.pg.job",
        )
    finally:
        await conn.close()
    assert row["result"] == "42"
    assert row["fresh"] is True
    assert row["done_by"].startswith("pid ")


async def test_the_session_lock_is_released_when_the_work_is_cancelled(
    postgres_server: PostgresServer, table: str
) -> None:
    """A cancelled leader ends its session, so its advisory lock goes with it."""
    backend = PostgresBackend(postgres_server.dsn, table=table)
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep(60)

    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(backend.run_once, "tests.pg.cancelled", forever)
            await started.wait()
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        key = _lock_key(table, "tests.pg.cancelled")
        await conn.execute("SET lock_timeout = 5000")
        await conn.execute("SELECT pg_advisory_lock($1)", key)
    finally:
        await conn.close()


@pytest.mark.parametrize("lock", ["session", "transaction"])
async def test_a_wrong_password_or_a_closed_port_raises_backend_error_without_the_password(
    postgres_server: PostgresServer, lock: str
) -> None:
    """Driver errors are wrapped, with the DSN's password masked and the driver's as cause."""
    dsns = [
        f"postgresql://fastapi_once:wrong-secret-pw@127.0.0.1:{postgres_server.port}/postgres",
        f"postgresql://fastapi_once:wrong-secret-pw@127.0.0.1:{free_port()}/postgres",
    ]
    for dsn in dsns:
        backend = PostgresBackend(dsn, lock=lock, connect_timeout=5)  # type: ignore[arg-type]
        with pytest.raises(BackendError, match="failed connecting") as info:
            await backend.run_once("tests.pg.job", answer)
        assert "wrong-secret-pw" not in str(info.value)
        assert "fastapi_once:***@127.0.0.1" in str(info.value)
        assert info.value.__cause__ is not None


def test_a_password_in_a_keyword_dsn_is_masked_too() -> None:
    """libpq ``key=value`` strings are masked as well as URLs."""
    backend = PostgresBackend("host=db user=app password=s3cret dbname=app")
    assert "s3cret" not in backend.describe()
    assert "password=***" in backend.describe()


def test_options_are_checked() -> None:
    """A bad table name or lock mode is a ValueError that says what is allowed."""
    with pytest.raises(ValueError, match="table"):
        PostgresBackend("postgresql://h/db", table="x; DROP TABLE y")
    with pytest.raises(ValueError, match="'session' or 'transaction'"):
        PostgresBackend("postgresql://h/db", lock="advisory")  # type: ignore[arg-type]
    assert "schema.t" in PostgresBackend("postgresql://h/db", table="schema.t").describe()


async def test_a_libpq_keyword_dsn_connects(postgres_server: PostgresServer, table: str) -> None:
    """``host=... port=... user=... password='...' dbname=...`` works like the URL."""
    dsn = (
        f"host=127.0.0.1 port={postgres_server.port} user=fastapi_once "
        f"password='{postgres_server.password}' dbname = postgres sslmode=disable"
    )
    backend = PostgresBackend(dsn, table=table)
    assert await backend.run_once("tests.pg.keywords", answer) == 42
    assert postgres_server.password not in backend.describe()
    assert "password=***" in backend.describe()


def test_a_keyword_dsn_with_an_unknown_keyword_names_it_and_what_works() -> None:
    """A typo in a keyword is a ValueError at construction, not a confusing driver error."""
    with pytest.raises(ValueError, match=r"'hots' is not supported; use dbname, .*host"):
        PostgresBackend("hots=db user=app password=s3cret")
    with pytest.raises(ValueError, match="cannot read the connection string") as info:
        PostgresBackend("host=db password='s3cret")
    assert "s3cret" not in str(info.value)


async def test_a_leader_draws_its_fencing_token_from_the_tables_sequence(
    postgres_server: PostgresServer, table: str
) -> None:
    """Each leader's token is the next value of ``<table>_fence``, so it only grows."""
    from fastapi_once.backends import fencing_token

    backend = PostgresBackend(postgres_server.dsn, table=table)
    tokens: list[int | None] = []

    async def work() -> None:
        tokens.append(fencing_token())

    await backend.run_once("tests.pg.fence", work)
    await backend.reset("tests.pg.fence")
    await backend.run_once("tests.pg.fence", work)
    await backend.run_once("tests.pg.other", work)
    assert tokens == [1, 2, 3]
    assert fencing_token() is None


@pytest.mark.parametrize("lock", ["session", "transaction"])
async def test_a_markers_ttl_runs_from_when_it_is_recorded_even_after_long_work(
    postgres_server: PostgresServer, table: str, lock: str
) -> None:
    """Work that takes longer than the ttl still records a live marker that another instance
    is served (with transaction locks, now() is when the lock was taken, not the record)."""
    first = PostgresBackend(postgres_server.dsn, table=table, lock=lock)
    second = PostgresBackend(postgres_server.dsn, table=table, lock=lock)

    async def slow() -> str:
        await anyio.sleep(1.5)
        return "made slowly"

    async def never() -> str:
        raise AssertionError("the marker expired as it was written")

    with anyio.fail_after(20):
        assert await first.run_once("tests.pg.slow", slow, ttl=1.0) == "made slowly"
        assert await second.run_once("tests.pg.slow", never, ttl=1.0) == "made slowly"
