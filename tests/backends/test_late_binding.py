"""``across=`` given as a URL or a factory: checked when the once is made, built at first use."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from fastapi_once import once
from fastapi_once.backends import Backend, FileLockBackend, backend_from_url


def test_backend_from_url_builds_the_backend_each_scheme_names(tmp_path: Path) -> None:
    """file:, redis:, rediss:, postgresql:, postgres:, mysql: and mariadb: URLs, with
    constructor options."""
    pytest.importorskip("redis")
    pytest.importorskip("asyncpg")
    pytest.importorskip("asyncmy")
    from fastapi_once.backends import MySQLBackend, PostgresBackend, RedisBackend

    file = backend_from_url(f"file://{tmp_path}/locks", wait_timeout=5)
    assert isinstance(file, FileLockBackend)
    assert (file.directory, file.wait_timeout) == (f"{tmp_path}/locks", 5)
    assert isinstance(backend_from_url("file://"), FileLockBackend)
    for url in ("redis://:pw@cache:6379/0", "rediss://cache:6380/1", "REDIS://cache"):
        assert isinstance(backend_from_url(url, namespace="app"), RedisBackend)
    for url in ("postgresql://app:pw@db/app", "postgres://app@db:5432/app"):
        made = backend_from_url(url, table="markers")
        assert isinstance(made, PostgresBackend)
        assert made.table == "markers"
    for url in ("mysql://app:pw@db/app", "mariadb://app@db:3307/app", "MYSQL://db/app"):
        made = backend_from_url(url, table="markers")
        assert isinstance(made, MySQLBackend)
        assert made.table == "markers"
    assert not (tmp_path / "locks").exists()  # nothing touched before first use


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mssql://root:hunter2@db/app", "unknown scheme"),
        ("mysql://root:hunter2@db", "needs a host and a database"),
        ("mariadb://root:hunter2@db:port/app", "the port is not a number"),
        ("mysql://root:hunter2@db/app?sslmode=on", "unknown option sslmode="),
        ("localhost:6379", "unknown scheme"),
        ("file://server/share", "not a host"),
    ],
)
def test_a_url_that_names_no_backend_is_refused_without_its_password(
    url: str, message: str
) -> None:
    """The error says which URLs work; a password in the URL is masked."""
    with pytest.raises(ValueError, match=message) as info:
        backend_from_url(url)
    assert "hunter2" not in str(info.value)


@pytest.mark.anyio
async def test_a_url_string_is_built_into_a_backend_at_first_use(tmp_path: Path) -> None:
    """``across="file:///dir"``: nothing exists until the once is called; then it runs once."""
    directory = tmp_path / "locks"
    runs = 0

    async def migrate() -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"schema": 3}

    migration = once(migrate, across=f"file://{directory}", name=f"t.url@{secrets.token_hex(4)}")
    assert not directory.exists()
    assert await migration() == {"schema": 3}
    assert directory.is_dir()
    await migration.reset()
    assert await migration() == {"schema": 3}
    assert runs == 2


@pytest.mark.anyio
async def test_a_factory_is_called_once_at_first_use_and_shared_by_the_onces_that_name_it(
    tmp_path: Path,
) -> None:
    """The factory runs when a once first needs it (e.g. in the lifespan), not when the module
    is imported; two onces given the same factory share the one backend it returns."""
    calls: list[Backend] = []

    def backend() -> Backend:
        made = FileLockBackend(tmp_path / "locks")
        calls.append(made)
        return made

    async def first() -> int:
        return 1

    async def second() -> int:
        return 2

    a = once(first, across=backend, name=f"t.first@{secrets.token_hex(4)}")
    b = once(second, across=backend, name=f"t.second@{secrets.token_hex(4)}")
    assert calls == []
    assert (await a(), await b(), await a()) == (1, 2, 1)
    assert len(calls) == 1


@pytest.mark.anyio
async def test_a_factory_may_return_a_url_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``across=lambda: os.environ["ONCE_BACKEND"]``: the 12-factor way."""
    import os

    monkeypatch.setenv("ONCE_BACKEND", f"file://{tmp_path}/from-env")

    async def seed() -> str:
        return "seeded"

    seeding = once(seed, across=lambda: os.environ["ONCE_BACKEND"], name="t.env.seed")
    assert await seeding() == "seeded"
    assert (tmp_path / "from-env").is_dir()


@pytest.mark.anyio
async def test_a_factory_that_returns_something_else_names_the_once_and_the_fix() -> None:
    """A factory returning neither a backend nor a URL is a TypeError at first use."""

    def settings() -> Any:
        return {"url": "redis://cache"}

    async def warm() -> None:
        return None

    warming = once(warm, across=settings, name="t.factory.wrong")
    with pytest.raises(TypeError, match=r"t\.factory\.wrong") as info:
        await warming()
    assert "returned a dict" in str(info.value)
    assert "a backend URL string" in str(info.value)


def test_describe_before_first_use_says_where_the_backend_will_come_from() -> None:
    """Before it is built, the backend describes its URL (password masked) or its factory."""
    from fastapi_once.backends._late import BoundBackend

    async def fn() -> None:
        return None

    def make_backend() -> Backend:
        raise AssertionError("not called by describe()")

    by_url = BoundBackend("redis://:hunter2@cache:6379/0", fn=fn, name="t")
    assert by_url.describe() == "backend at redis://:***@cache:6379/0 (built at first use)"
    by_factory = BoundBackend(make_backend, fn=fn, name="t")
    assert "make_backend()" in by_factory.describe()


def test_each_event_loop_calls_the_factory_again(tmp_path: Path) -> None:
    """A new loop (a test's new TestClient, a second asyncio.run) reads the configuration anew;
    within one loop the factory runs once."""
    import anyio

    directories = iter([tmp_path / "first", tmp_path / "second"])
    calls: list[Path] = []

    def backend() -> Backend:
        calls.append(next(directories))
        return FileLockBackend(calls[-1])

    async def job() -> str:
        return "done"

    done = once(job, across=backend, name=f"t.loops@{secrets.token_hex(4)}")

    async def twice() -> None:
        assert await done() == "done"
        await done.reset()
        assert await done() == "done"

    anyio.run(twice)
    anyio.run(twice)
    assert calls == [tmp_path / "first", tmp_path / "second"]
    assert (tmp_path / "second").is_dir()


@pytest.mark.anyio
async def test_closing_at_shutdown_closes_the_backends_built_in_this_loop_and_not_the_apps_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """close_built (once_lifespan's shutdown) closes the backends built from a factory in the
    running loop, logging a failure by its type only; a backend object the app made is the
    app's to close; the next use builds a new backend."""
    import logging

    from fastapi_once.backends._late import BoundBackend, close_built

    closed: list[str] = []

    class Closing(FileLockBackend):
        async def aclose(self) -> None:
            closed.append(self.directory)
            if self.directory.endswith("broken"):
                raise OSError("s3cret driver text")

    async def fn() -> None:
        return None

    def late() -> Backend:
        return Closing(tmp_path / "late")

    def broken() -> Backend:
        return Closing(tmp_path / "broken")

    bound = [BoundBackend(late, fn=fn, name="t.close"), BoundBackend(broken, fn=fn, name="t.b")]
    given = BoundBackend(Closing(tmp_path / "given"), fn=fn, name="t.close")
    for each in (*bound, given):
        await each.share(None, fn, ttl=None)
    assert bound[0].describe() == f"FileLockBackend({tmp_path / 'late'})"
    with caplog.at_level(logging.WARNING, logger="fastapi_once"):
        await close_built()
    assert sorted(closed) == [str(tmp_path / "broken"), str(tmp_path / "late")]
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "backend_close_failed"]
    shown = f"FileLockBackend({tmp_path / 'broken'})"
    assert record.getMessage() == f"closing {shown} failed with OSError"
    assert "s3cret" not in caplog.text
    assert bound[0].describe().endswith(".late() (built at first use)")
