"""fastapi_once.alembic: the upgrade to the scripts' heads, once across processes.

On real PostgreSQL and MariaDB (async engines, asyncpg and asyncmy; the lock is the migrated
database's own) and SQLite with the file store (sync engine under asyncio, and async with
aiosqlite under trio), with real processes whose lifespans start together: each revision runs
once; a new revision runs once more, alone; a failing revision is not recorded and the next
start retries it; a killed leader's upgrade is completed by another process. In process: the
lock lost or a newer fencing token (PostgreSQL, MariaDB) stops the leader before the next
revision; an older app leaves a newer database alone and says so; callers in one process share
one upgrade and its failure.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from alembic_project import add_revision, config_of, runs, write_project
from backend_servers import HERE, ROOT, MariaDBServer, PostgresServer, require, wait_for

from fastapi_once import Once
from fastapi_once.alembic import FENCE_TABLE, database_lock, include_name, upgrade
from fastapi_once.backends import FileLockBackend, LeaseLostError

WORKER = HERE / "alembic_worker.py"


@dataclass
class Database:
    """A database to migrate: its SQLAlchemy URL, the file store's directory (None: the
    database's own lock), the event loop the workers run on, how to query it, and the query
    that lists its tables."""

    url: str
    locks: str | None
    loop: str
    query: Callable[[str], list[tuple[Any, ...]]]
    list_tables: str
    per_revision: bool = False

    def spec(self, project: Path) -> dict[str, Any]:
        return {
            "project": str(project),
            "url": self.url,
            "locks": self.locks,
            "loop": self.loop,
            "per_revision": self.per_revision,
        }

    def tables(self) -> set[str]:
        return {row[0] for row in self.query(self.list_tables)}

    def version(self) -> list[str]:
        """The revisions in the version table (none if it does not exist)."""
        if "alembic_version" not in self.tables():
            return []
        return sorted(row[0] for row in self.query("SELECT version_num FROM alembic_version"))

    def applied(self) -> list[tuple[str, int]]:
        """``(revision, pid)`` of each revision whose transaction committed."""
        if "applied" not in self.tables():
            return []
        return [(r, p) for r, p in self.query("SELECT revision, pid FROM applied ORDER BY 1")]


def sqlite_database(path: Path, driver: str, loop: str) -> Database:
    def query(sql: str) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(path)
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    locks = str(path.parent / "locks")
    tables = "SELECT name FROM sqlite_master WHERE type = 'table'"
    return Database(f"sqlite{driver}:///{path}", locks, loop, query, tables)


def postgres_database(server: PostgresServer) -> Database:
    import asyncpg  # type: ignore[import-untyped]

    name = "m" + secrets.token_hex(6)

    async def run(dsn: str, sql: str) -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        finally:
            await connection.close()

    asyncio.run(run(server.dsn, f'CREATE DATABASE "{name}"'))
    dsn = server.dsn.rpartition("/")[0] + f"/{name}"
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    return Database(url, None, "asyncio", lambda sql: asyncio.run(run(dsn, sql)), tables)


def mariadb_database(server: MariaDBServer) -> Database:
    import asyncmy  # type: ignore[import-untyped,unused-ignore]

    name = "m" + secrets.token_hex(6)

    async def run(database: str, sql: str) -> list[tuple[Any, ...]]:
        connection = await asyncmy.connect(
            host="127.0.0.1",
            port=server.port,
            user="fastapi_once",
            password=server.password,
            db=database,
            autocommit=True,
        )
        try:
            async with connection.cursor() as cursor:
                await cursor.execute(sql)
                return [tuple(row) for row in await cursor.fetchall()]
        finally:
            connection.close()

    asyncio.run(run("fastapi_once_tests", f"CREATE DATABASE {name}"))
    url = f"mariadb+asyncmy://fastapi_once:{server.password}@127.0.0.1:{server.port}/{name}"
    tables = "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
    return Database(url, None, "asyncio", lambda sql: asyncio.run(run(name, sql)), tables)


@pytest.fixture(params=["postgres", "mariadb", "sqlite", "sqlite-async"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A fresh database: PostgreSQL (asyncpg; in one transaction per revision, or one for the
    whole upgrade), MariaDB (asyncmy), SQLite (pysqlite) or SQLite (aiosqlite)."""
    if request.param == "mariadb":
        return mariadb_database(request.getfixturevalue("mariadb_server"))
    if request.param.startswith("postgres"):
        made = postgres_database(request.getfixturevalue("postgres_server"))
        made.per_revision = request.param == "postgres-per-revision"
        return made
    if request.param == "sqlite":
        return sqlite_database(tmp_path / "app.db", "", "asyncio")
    return sqlite_database(tmp_path / "app.db", "+aiosqlite", "trio")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An Alembic project with no revision yet."""
    return write_project(tmp_path / "migrations")


@dataclass
class Forker:
    """A process of ``alembic_worker.py``, which forks app processes that start together."""

    parent: subprocess.Popen[str]

    def launch(self, n: int, spec: dict[str, Any], gate: Path | None) -> None:
        """Start ``n`` app processes at once; return at once."""
        assert self.parent.stdin is not None
        gated = None if gate is None else str(gate)
        self.parent.stdin.write(json.dumps({"n": n, "spec": spec, "gate": gated}) + "\n")
        self.parent.stdin.flush()

    def reports(self) -> list[dict[str, Any]]:
        """Each app's JSON report (or how it was killed), by pid, once all have ended."""
        assert self.parent.stdout is not None
        lines = iter(self.parent.stdout.readline, "done\n")
        reports = [json.loads(line) for line in lines if line]
        assert reports, "the worker ended early"
        return sorted(reports, key=lambda report: report["pid"])


@pytest.fixture(scope="module")
def forker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forker]:
    """The module's forker of app processes, its imports done once."""
    log = tmp_path_factory.mktemp("forker") / "stderr"
    with open(log, "w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"},
        )
    assert parent.stdout is not None
    assert parent.stdout.readline() == "ready\n", log.read_text()
    yield Forker(parent)
    parent.communicate(input="", timeout=30)


@dataclass
class Apps:
    """Starts app processes on the test's database and project."""

    forker: Forker
    spec: dict[str, Any]
    gate: Path

    def launch(self, n: int) -> None:
        """Start ``n`` app processes at once; return at once."""
        self.forker.launch(n, self.spec, self.gate)

    def reports(self) -> list[dict[str, Any]]:
        """Each app's report (or how it was killed), by pid, once all have ended."""
        return self.forker.reports()

    def run(self, n: int) -> list[dict[str, Any]]:
        """Start ``n`` app processes at once; return their reports once all have ended."""
        self.launch(n)
        return self.reports()


@pytest.fixture
def apps(forker: Forker, database: Database, project: Path, tmp_path: Path) -> Apps:
    """App processes of the test; their revisions' gate is ``tmp_path/gate``."""
    (tmp_path / "gate").mkdir()
    return Apps(forker, database.spec(project), tmp_path / "gate")


async def call_catching(
    migrate: Once[[], list[str]], kind: type[BaseException], into: list[BaseException]
) -> None:
    """Call ``migrate``; append what it raises of ``kind`` to ``into``."""
    try:
        await migrate()
    except kind as exc:
        into.append(exc)


async def wait_until(check: Callable[[], Awaitable[object]]) -> None:
    """Poll ``check()`` until it returns something true."""
    with anyio.fail_after(30):
        while not await check():  # noqa: ASYNC110 - a database's state, no event to wait on
            await anyio.sleep(0.01)


def revisions_run(project: Path) -> list[str]:
    """The revisions that started to run, in order."""
    return [what for what, _ in runs(project) if what != "env-exit"]


def upgrades_run(project: Path) -> int:
    """How many times ``env.py`` ran: the upgrade's runs."""
    return sum(what == "env-exit" for what, _ in runs(project))


# --- across processes -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_processes_starting_at_once_run_each_revision_once_and_a_new_one_once_more(
    database: Database, project: Path, apps: Apps
) -> None:
    """8 processes start together: one upgrades (each revision once), all get the heads. A
    revision added later is run by the next start, alone and once, with no version to bump."""
    add_revision(project, "0001", None)
    add_revision(project, "0002", "0001")
    reports = apps.run(8)
    assert [report.get("ok") for report in reports] == [["0002"]] * 8, reports
    assert revisions_run(project) == ["0001", "0002"]
    assert upgrades_run(project) == 1
    (leader,) = {pid for _, pid in database.applied()}
    assert leader in {report["pid"] for report in reports}
    assert [r for r, _ in database.applied()] == ["0001", "0002"]
    # Without a file store, the lock and its marker are the database's own: the records' table
    # of its store (MariaDB's fastapi_once, PostgreSQL's fastapi_once_lease) is there.
    records = database.tables() & {"fastapi_once", "fastapi_once_lease"}
    assert bool(records) == (database.locks is None)

    add_revision(project, "0003", "0002")
    reports = apps.run(4)
    assert [report.get("ok") for report in reports] == [["0003"]] * 4, reports
    assert revisions_run(project) == ["0001", "0002", "0003"]
    assert upgrades_run(project) == 2
    assert database.version() == ["0003"]


@pytest.mark.timeout(90)
def test_a_failing_revision_is_not_recorded_and_the_next_start_retries_it(
    database: Database, project: Path, apps: Apps
) -> None:
    """Every starting process fails with the revision's error, nothing of it is committed and
    no marker is kept: once the revision is fixed, the next start runs it."""
    add_revision(project, "0001", None)
    assert [report.get("ok") for report in apps.run(1)] == [["0001"]]
    add_revision(project, "0002", "0001", fails=True)
    reports = apps.run(3)
    assert all(report.get("error") == "RuntimeError" for report in reports), reports
    assert {report["message"] for report in reports} == {"revision 0002 is broken"}
    assert database.version() == ["0001"]
    assert "t_0002" not in database.tables()
    tried = [pid for what, pid in runs(project) if what == "0002"]
    assert sorted(tried) == [report["pid"] for report in reports]  # each tried once, in turn

    add_revision(project, "0002", "0001")
    assert [report.get("ok") for report in apps.run(1)] == [["0002"]]
    assert database.version() == ["0002"]
    assert [r for r, _ in database.applied()] == ["0001", "0002"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "database",
    ["postgres", "postgres-per-revision", "mariadb", "sqlite", "sqlite-async"],
    indirect=True,
)
def test_a_killed_leader_mid_upgrade_leaves_the_upgrade_to_another_process(
    database: Database, project: Path, apps: Apps, tmp_path: Path
) -> None:
    """The leader is killed inside revision 0002: one of the waiting processes takes the lock
    and completes the upgrade; each revision is committed once, by that process."""
    gate = tmp_path / "gate"
    add_revision(project, "0001", None)
    add_revision(project, "0002", "0001", gated=True)
    apps.launch(3)
    wait_for(lambda: any(gate.iterdir()), timeout=30, what="the leader to reach revision 0002")
    (entered,) = gate.iterdir()
    killed = int(entered.name.removeprefix("entered-"))
    os.kill(killed, signal.SIGKILL)
    (gate / "open").touch()  # after the kill: the killed process never runs past the gate
    reports = apps.reports()
    assert {"pid": killed, "killed": signal.SIGKILL} in reports
    survivors = {report["pid"] for report in reports if report.get("ok") == ["0002"]}
    assert len(survivors) == 2, reports
    committed = dict(database.applied())
    assert list(committed) == ["0001", "0002"]
    assert committed["0002"] in survivors
    # One transaction for the whole upgrade (PostgreSQL's default), which the kill rolled back;
    # or one per revision (SQLite's and MariaDB's, without transactional DDL): 0001 was
    # committed already.
    whole = database.url.startswith("postgresql") and not database.per_revision
    assert committed["0001"] in (survivors if whole else {killed})
    assert ("0002", killed) in runs(project)
    assert database.version() == ["0002"]


# --- in one process -----------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.mark.anyio
async def test_callers_in_one_process_share_one_upgrade_and_its_failure(
    project: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """Concurrent callers get the same exception from one run; with cooldown= a call meanwhile
    fails fast with it; nothing was recorded, so after the cooldown a call runs it again."""
    add_revision(project, "0001", None, fails=True)
    config = config_of(project, sqlite_url)
    migrate = upgrade(config, across=FileLockBackend(str(tmp_path / "locks")), cooldown=60)
    errors: list[BaseException] = []
    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(call_catching, migrate, RuntimeError, errors)
    assert len(errors) == 3
    assert errors[0] is errors[1] is errors[2]
    with pytest.raises(RuntimeError) as again:
        await migrate()
    assert again.value is errors[0]
    assert revisions_run(project) == ["0001"]
    await migrate.reset()  # ends the cooldown: the next call runs the upgrade again
    with pytest.raises(RuntimeError, match="revision 0001 is broken"):
        await migrate()
    assert revisions_run(project) == ["0001", "0001"]


@pytest.mark.anyio
async def test_an_older_app_on_a_newer_database_does_not_downgrade_and_says_so(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An app whose scripts stop at 0001, on a database a newer app upgraded to 0002 (with a
    store of its own, so no marker): it leaves the database at 0002 and logs one line."""
    newer = write_project(tmp_path / "newer")
    add_revision(newer, "0001", None)
    add_revision(newer, "0002", "0001")
    locks = FileLockBackend(str(tmp_path / "locks"))
    assert await upgrade(config_of(newer, sqlite_url), across=locks)() == ["0002"]
    older = write_project(tmp_path / "older")
    add_revision(older, "0001", None)
    other = FileLockBackend(str(tmp_path / "other-locks"))
    caplog.clear()  # only the older app's run
    with caplog.at_level(logging.WARNING, logger="fastapi_once"):
        assert await upgrade(config_of(older, sqlite_url), across=other)() == ["0002"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "fastapi_once"]
    assert "at revision 0002, which these migrations do not have" in line
    assert "not downgrading" in line
    assert revisions_run(older) == []
    connection = sqlite3.connect(tmp_path / "app.db")
    assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    connection.close()


def test_sqlite_without_a_file_store_is_refused_naming_the_fix(
    project: Path, sqlite_url: str
) -> None:
    """SQLite cannot hold the lock: upgrade() says to pass across=FileLockBackend(...)."""
    add_revision(project, "0001", None)
    with pytest.raises(ValueError, match=r"target sqlite.*across=FileLockBackend\("):
        upgrade(config_of(project, sqlite_url))


@pytest.mark.anyio
async def test_a_url_known_only_at_first_use_is_checked_then(
    project: Path, sqlite_url: str
) -> None:
    """url= a function: a SQLite URL without across= fails at the first call, with the fix."""
    add_revision(project, "0001", None)
    migrate = upgrade(config_of(project, "sqlite://"), url=lambda: sqlite_url, name="late")
    with pytest.raises(ValueError, match="across=FileLockBackend"):
        await migrate()


@pytest.mark.anyio
async def test_url_sets_the_database_that_env_py_migrates(
    project: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """url= (a function, read at the run) becomes the config's sqlalchemy.url for env.py."""
    add_revision(project, "0001", None)
    config = config_of(project, "sqlite:///" + str(tmp_path / "not-this.db"))
    locks = FileLockBackend(str(tmp_path / "locks"))
    assert await upgrade(config, url=lambda: sqlite_url, across=locks)() == ["0001"]
    assert (tmp_path / "app.db").exists()
    assert not (tmp_path / "not-this.db").exists()


@pytest.mark.parametrize("option", ["version", "key"])
def test_version_and_key_are_refused(project: Path, option: str) -> None:
    """The version is the head set: version= (or key=) is a ValueError saying so."""
    add_revision(project, "0001", None)
    config = config_of(project, "postgresql://db/app")
    with pytest.raises(ValueError, match=f"version is the scripts' head revisions.*drop {option}="):
        upgrade(config, **{option: 2})


def test_scripts_without_a_revision_are_refused(project: Path) -> None:
    with pytest.raises(ValueError, match="no revision"):
        upgrade(config_of(project, "postgresql://db/app"))


def test_no_url_at_all_is_refused_at_first_use(project: Path) -> None:
    add_revision(project, "0001", None)
    config = config_of(project, "")
    config.remove_main_option("sqlalchemy.url")
    migrate = upgrade(config, name="nourl")
    with pytest.raises(ValueError, match=r"set sqlalchemy\.url in the Alembic config, pass url="):
        asyncio.run(migrate())


def test_a_postgres_url_of_any_driver_locks_on_that_database_without_its_password() -> None:
    """postgresql+asyncpg:// and postgresql+psycopg:// give a PostgresBackend on the same
    database, waiting as long as the leader holds the lock; the password never shows."""
    from fastapi_once.backends import PostgresBackend

    for driver in ("+asyncpg", "+psycopg", "+psycopg2", ""):
        url = f"postgresql{driver}://app:s3cret@db.internal:6432/shop?sslmode=require"
        backend = database_lock(url)
        assert isinstance(backend, PostgresBackend)
        assert backend.wait_timeout is None
        assert "db.internal:6432/shop" in backend.describe()
        assert "s3cret" not in backend.describe() + repr(backend)


def test_a_mysql_url_of_any_driver_locks_on_that_database_without_its_password() -> None:
    """mysql+asyncmy://, mysql+pymysql://, mariadb+...:// give a MySQLBackend on the same
    database (mysql:// or mariadb://), waiting as long as the leader holds the lock; of the
    query, only ssl= is kept; the password (URL-quoted or not) never shows."""
    require("asyncmy")
    from fastapi_once.backends import MySQLBackend

    for scheme in ("mysql+asyncmy", "mysql+pymysql", "mysql+aiomysql", "mysql", "mariadb+asyncmy"):
        url = f"{scheme}://app:s3cr%40t@db.internal:3307/shop?charset=utf8mb4&ssl=true"
        backend = database_lock(url)
        assert isinstance(backend, MySQLBackend)
        assert backend.wait_timeout is None
        dialect = scheme.partition("+")[0]
        shown = f"{dialect}://app:***@db.internal:3307/shop?ssl=true"
        assert backend.describe() == f"MySQLBackend({shown}, table=fastapi_once)"
        assert "s3cr" not in backend.describe() + repr(backend)
    plain = database_lock("mariadb+pymysql://app:pw@db/shop?ssl=0&read_timeout=5")
    assert (
        plain.describe() == "MySQLBackend(mariadb://app:***@db/shop?ssl=false, table=fastapi_once)"
    )


@pytest.mark.parametrize(
    "query", ["ssl_ca=/etc/ca.pem", "ssl=required", "ssl_mode=REQUIRED", "unix_socket=/run/s"]
)
def test_a_mysql_url_whose_tls_or_socket_the_lock_cannot_use_is_refused(query: str) -> None:
    """A connection option the MySQL store cannot carry over is refused, not dropped (the lock
    would connect in the clear, or elsewhere), naming it and across=, without the password."""
    require("asyncmy")
    with pytest.raises(ValueError, match=f"cannot use {query.partition('=')[0]}=.*across=") as info:
        database_lock(f"mysql+pymysql://app:s3cret@db/shop?{query}")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mssql+pyodbc://sa:s3cret@db/app", "target mssql, where fastapi_once cannot lock.*MySQL"),
        ("not a url with s3cret", "is not a SQLAlchemy URL"),
    ],
)
def test_a_database_that_cannot_lock_is_refused_without_its_password(
    url: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        database_lock(url)
    assert "s3cret" not in str(info.value)


def test_autogenerate_skips_the_tables_of_fastapi_once() -> None:
    """include_name() leaves out fastapi_once's tables (markers and fences), keeps the rest."""
    assert not include_name("fastapi_once", "table", {})
    assert not include_name(FENCE_TABLE, "table", {})
    assert include_name("users", "table", {})
    assert include_name("fastapi_once_ix", "index", {})


# --- the lock lost, or a newer leader: on PostgreSQL --------------------------------------------


@pytest.fixture
def postgres(postgres_server: PostgresServer) -> Database:
    return postgres_database(postgres_server)


@pytest.fixture(params=["postgres", "mariadb"])
def fenced(request: pytest.FixtureRequest) -> Database:
    """A fresh database whose own lock (the default) has a fencing token."""
    if request.param == "mariadb":
        return mariadb_database(request.getfixturevalue("mariadb_server"))
    return postgres_database(request.getfixturevalue("postgres_server"))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.timeout(60)
@pytest.mark.parametrize("revisions", [2, 1])
async def test_a_leader_that_loses_its_lock_stops_before_the_next_revision(
    postgres: Database,
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    revisions: int,
) -> None:
    """The lock's session ends while revision 0001 runs: the caller gets LeaseLostError and the
    leader's thread goes no further than 0001, whose transaction is rolled back (also when 0001
    is the last revision: the transaction is not committed)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("GATE", str(gate))
    add_revision(project, "0001", None, gated=True)
    if revisions == 2:
        add_revision(project, "0002", "0001")
    migrate = upgrade(config_of(project, postgres.url), name="lost")
    lost: list[BaseException] = []
    async with anyio.create_task_group() as group:
        group.start_soon(call_catching, migrate, LeaseLostError, lost)
        await anyio.to_thread.run_sync(lambda: wait_for(lambda: any(gate.iterdir())))
        await anyio.to_thread.run_sync(
            postgres.query,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'",
        )
    assert len(lost) == 1
    (gate / "open").touch()
    await anyio.to_thread.run_sync(
        lambda: wait_for(lambda: upgrades_run(project) == 1, what="the leader's thread")
    )
    assert revisions_run(project) == ["0001"]
    assert await anyio.to_thread.run_sync(postgres.version) == []
    assert "applied" not in await anyio.to_thread.run_sync(postgres.tables)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_leader_with_an_older_fencing_token_than_the_database_s_does_not_migrate(
    fenced: Database, project: Path
) -> None:
    """A newer leader's token is in fastapi_once_alembic: this leader's upgrade is refused with
    LeaseLostError before any revision, and nothing is committed."""
    add_revision(project, "0001", None)
    query = functools.partial(anyio.to_thread.run_sync, fenced.query)
    await query(f"CREATE TABLE {FENCE_TABLE} (name VARCHAR(200) PRIMARY KEY, token BIGINT)")
    await query(f"INSERT INTO {FENCE_TABLE} VALUES ('fenced', {2**62})")
    migrate = upgrade(config_of(project, fenced.url), name="fenced")
    with pytest.raises(LeaseLostError, match="a newer leader wrote fencing token"):
        await migrate()
    assert revisions_run(project) == []
    assert await anyio.to_thread.run_sync(fenced.version) == []
    await query(f"DELETE FROM {FENCE_TABLE}")
    assert await migrate() == ["0001"]
    assert await query(f"SELECT token < {2**62} FROM {FENCE_TABLE}") == [(True,)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.timeout(60)
async def test_a_leader_that_waited_for_the_fence_while_another_migrated_applies_nothing(
    postgres: Database, project: Path
) -> None:
    """Two leaders at once (a lost lock let a second one in): the second waits for the first's
    fence row, and when the first commits, finds the version table changed since it read it; it
    raises LeaseLostError and applies nothing."""
    import asyncpg

    add_revision(project, "0001", None)
    dsn = postgres.url.replace("postgresql+asyncpg://", "postgresql://")
    fence_table = f"CREATE TABLE {FENCE_TABLE} (name VARCHAR(200) PRIMARY KEY, token BIGINT)"
    first = await asyncpg.connect(dsn)
    try:
        await first.execute(fence_table)
        await first.execute(f"INSERT INTO {FENCE_TABLE} VALUES ('raced', 0)")
        await first.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        transaction = first.transaction()
        await transaction.start()
        await first.execute(f"SELECT token FROM {FENCE_TABLE} WHERE name = 'raced' FOR UPDATE")
        migrate = upgrade(config_of(project, postgres.url), name="raced")
        lost: list[BaseException] = []
        blocked = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
        async with anyio.create_task_group() as group:
            group.start_soon(call_catching, migrate, LeaseLostError, lost)
            await wait_until(lambda: first.fetchval(blocked))  # the second waits for the row
            await first.execute("INSERT INTO alembic_version VALUES ('0001')")
            await transaction.commit()
    finally:
        await first.close()
    (error,) = lost
    assert "another leader migrated while this one waited" in str(error)
    assert revisions_run(project) == []


# --- the docs' recipe -----------------------------------------------------------------------------


def test_the_docs_recipe_migrates_at_startup_and_reports_ready(
    postgres: Database, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Migrations section's example, run beside an alembic.ini with DATABASE_URL set: the
    app's startup upgrades the database, and /ready answers 200."""
    from fastapi.testclient import TestClient

    section = (ROOT / "docs" / "migrations.md").read_text()
    block = section[section.index("```py\n") + len("```py\n") : section.index("```\n\n-")]
    add_revision(project, "0001", None)
    (tmp_path / "alembic.ini").write_text(f"[alembic]\nscript_location = {project}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", postgres.url)
    namespace: dict[str, Any] = {"__name__": "readme_migrations"}
    exec(compile(block, "docs/migrations.md", "exec"), namespace)
    with TestClient(namespace["app"]) as http:
        assert http.get("/ready").status_code == 200
    assert postgres.version() == ["0001"]
