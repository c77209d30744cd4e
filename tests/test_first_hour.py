"""The first hour's mistakes get a message that names the once and the fix.

An uncalled once_lifespan, a keyed once called with the wrong arguments, a ping that returns
False, and a TestClient used without ``with`` (each request in a new event loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from fastapi_once import OnceLoopWarning, once, once_lifespan, readiness_router

ROOT = Path(__file__).parent.parent


def test_an_uncalled_once_lifespan_says_call_it() -> None:
    """FastAPI(lifespan=once_lifespan) fails at startup with a TypeError that says to call it."""
    app = FastAPI(lifespan=once_lifespan)  # type: ignore[arg-type]
    expected = r"call it: FastAPI\(lifespan=once_lifespan\(\.\.\.\)\)"
    with pytest.raises(TypeError, match=expected), TestClient(app):
        pass


@pytest.mark.anyio
async def test_a_keyed_once_called_with_missing_arguments_names_the_once_and_its_signature() -> (
    None
):
    """The error names the once and its parameters, not the key= lambda."""

    @once(key=lambda url, version: (url, version), name="app.fetch")
    async def fetch(url: str, version: int) -> str:
        return url

    with pytest.raises(TypeError) as caught:
        await fetch("/a")  # type: ignore[call-arg]
    message = str(caught.value)
    assert message == (
        "app.fetch(url, version) was called with arguments that do not fit: missing a "
        "required argument: 'version'; call it as app.fetch(url, version)"
    )
    assert "lambda" not in message
    with pytest.raises(
        TypeError, match=r"too many positional arguments; call it as app\.fetch\(url, version\)"
    ):
        await fetch.reset("/a", "1", "extra")  # type: ignore[call-arg]


@pytest.mark.anyio
async def test_a_key_functions_own_type_error_reaches_the_caller_unchanged() -> None:
    """Arguments that fit the once but fail inside key= keep the key function's own error."""

    @once(key=lambda url: url + 1)
    async def fetch(url: str) -> str:
        return url

    with pytest.raises(TypeError, match="can only concatenate str"):
        await fetch("/a")


@pytest.mark.anyio
async def test_a_ping_that_returns_false_is_reported_as_returning_false(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not as a ConnectionError it never raised: the route, the log and the metric say so."""

    @once(name="first_hour.db", ping=lambda pool: False)
    async def get_db() -> str:
        return "pool"

    app = FastAPI()
    app.include_router(readiness_router(get_db, details=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await get_db()
        response = await http.get("/ready")
    entry = response.json()["onces"]["first_hour.db"]
    assert response.status_code == 503
    assert (entry["ping"], entry["ping_error"]) == ("failed", "returned False")
    assert entry["ping_message"] == "ping returned False"
    assert "first_hour.db: readiness ping returned False" in caplog.text
    assert "ConnectionError" not in caplog.text


def _bare_client_app() -> tuple[FastAPI, Any, list[str]]:
    made: list[str] = []

    @once(name="first_hour.settings")
    async def settings() -> str:  # no cleanup: nothing to do at the loop's end
        made.append("settings")
        return "settings"

    app = FastAPI()

    @app.get("/")
    async def root(value: str = Depends(settings)) -> str:
        return value

    return app, settings, made


def test_a_bare_testclient_warns_for_a_once_without_a_cleanup() -> None:
    """Each request makes the value again: an OnceLoopWarning at the once's own line says why."""
    app, settings, made = _bare_client_app()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bare = TestClient(app)
        assert bare.get("/").json() == "settings"
        assert bare.get("/").json() == "settings"
    assert made == ["settings", "settings"]
    (report,) = [w for w in caught if issubclass(w.category, OnceLoopWarning)]
    assert issubclass(report.category, UserWarning)
    assert str(report.message).startswith("first_hour.settings: its value is made again")
    assert "with TestClient(app)" in str(report.message)
    code = settings.fn.__code__
    assert (report.filename, report.lineno) == (code.co_filename, code.co_firstlineno)


def test_with_testclient_and_once_lifespan_nothing_is_made_twice_or_reported() -> None:
    """Two `with TestClient(app)` blocks: the lifespan's teardown makes the second one expected."""
    app, _, made = _bare_client_app()
    app.router.lifespan_context = once_lifespan()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with TestClient(app) as http:
                assert http.get("/").json() == "settings"
                assert http.get("/").json() == "settings"
    assert made == ["settings", "settings"]  # once per lifespan
    assert not [w for w in caught if issubclass(w.category, OnceLoopWarning)]


def test_loops_that_overlap_in_time_are_not_reported() -> None:
    """A once used in a second loop while the first still runs (threads, say) is no mistake."""

    @once
    async def value() -> int:
        return 1

    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(value()) == 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert asyncio.run(value()) == 1
        assert not [w for w in caught if issubclass(w.category, OnceLoopWarning)]
    finally:
        first.close()


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


BARE_CLIENT = """
from typing import Annotated
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from fastapi_once import once


@once
async def settings() -> str:
    return "settings"


app = FastAPI()


@app.get("/")
async def root(value: Annotated[str, Depends(settings)]) -> str:
    return value


def test_bare_client() -> None:
    client = TestClient(app)
    for _ in range(3):
        assert client.get("/").json() == "settings"


if __name__ == "__main__":
    test_bare_client()
"""


def test_the_warning_shows_under_pythons_default_filters(tmp_path: Path) -> None:
    """A script run with plain `python` prints the warning once, at the once's line."""
    (tmp_path / "bare.py").write_text(textwrap.dedent(BARE_CLIENT))
    run = _run(["bare.py"], tmp_path)
    line = textwrap.dedent(BARE_CLIENT).splitlines().index("@once") + 1
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("OnceLoopWarning") == 1, run.stderr
    assert f"bare.py:{line}: OnceLoopWarning: __main__.settings: its value is made" in run.stderr


def test_the_warning_shows_in_pytests_summary_under_its_default_filters(tmp_path: Path) -> None:
    """pytest without warning options lists it in its warnings summary."""
    (tmp_path / "test_bare.py").write_text(textwrap.dedent(BARE_CLIENT))
    # A subprocess: in this one the suite's filterwarnings=error would turn the warning into an
    # error. Plain pytest: the installed plugins (none filters this warning) are not loaded,
    # which spares importing and assertion-rewriting each one's package.
    plain = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = _run(["-m", "pytest", "-p", "no:cacheprovider", "test_bare.py"], tmp_path, plain)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "warnings summary" in run.stdout
    assert "OnceLoopWarning: test_bare.settings: its value is made again" in run.stdout


logging.getLogger("fastapi_once").setLevel(logging.INFO)


def test_the_warning_points_at_the_function_behind_a_method_or_a_partial() -> None:
    """A once over a bound method or a functools.partial warns at the wrapped function's line."""
    import functools

    class Store:
        async def pool(self) -> str:
            return "pool"

    async def fetch(url: str) -> str:
        return url

    store = Store()
    bound, partial = once(store.pool), once(functools.partial(fetch, "/a"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert asyncio.run(bound()) == "pool"
            assert asyncio.run(partial()) == "/a"
    reports = [w for w in caught if issubclass(w.category, OnceLoopWarning)]
    lines = {w.lineno for w in reports}
    assert lines == {Store.pool.__code__.co_firstlineno, fetch.__code__.co_firstlineno}
