"""Shutdown as operators see it: 503 with Retry-After, and the grace period under uvicorn."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from serving import running

from fastapi_once import OnceClosedError, OnceError, once, once_closed_handler, once_lifespan


def _app(**lifespan_options: Any) -> FastAPI:
    @once(name="shutdown.db")
    async def get_db() -> str:
        return "db"

    app = FastAPI(lifespan=once_lifespan(**lifespan_options))

    @app.get("/")
    async def root(request: Request) -> str:
        return str(await get_db())

    return app


async def _after_shutdown(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        async with LifespanManager(app):
            pass  # started, then shut down: the loop's onces are closed
        return await http.get("/")


@pytest.mark.anyio
async def test_a_request_after_shutdown_began_gets_503_with_retry_after() -> None:
    """OnceClosedError is answered 503 + Retry-After by the handler once_lifespan installs."""
    response = await _after_shutdown(_app())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "the service is shutting down; retry the request"}
    assert "shutdown.db" not in response.text


@pytest.mark.anyio
async def test_an_apps_own_handler_for_once_closed_error_is_kept() -> None:
    """The installed handler is a default: the app's own (for the error or a base) replaces it."""
    for handled in (OnceClosedError, OnceError):
        app = _app()

        async def mine(request: Request, exc: Exception) -> PlainTextResponse:
            return PlainTextResponse("mine", status_code=418)

        app.add_exception_handler(handled, mine)
        response = await _after_shutdown(app)
        assert (response.status_code, response.text) == (418, "mine")
        assert app.exception_handlers[handled] is mine


def test_the_handler_is_public_for_apps_that_install_it_themselves() -> None:
    """An app whose middleware hides the stack can add it by hand, as the docs say."""
    app = FastAPI()
    app.add_exception_handler(OnceClosedError, once_closed_handler)
    assert app.exception_handlers[OnceClosedError] is once_closed_handler


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fastapi_once" and r.levelno == logging.WARNING
    ]


def test_a_shutdown_timeout_longer_than_uvicorns_grace_period_is_logged_at_startup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under real uvicorn with --timeout-graceful-shutdown 2, shutdown_timeout=5 is reported."""
    with running(_app(shutdown_timeout=5), timeout_graceful_shutdown=2) as url:
        assert httpx.get(url).json() == "db"
        (message,) = _warnings(caplog)
    assert message.startswith(
        "once_lifespan(shutdown_timeout=5) is longer than the server's grace period "
        "(uvicorn --timeout-graceful-shutdown 2): after SIGTERM the process may take about 7 s"
    )
    assert "terminationGracePeriodSeconds" in message


@pytest.mark.parametrize("grace", [None, 10, 30])
def test_a_shutdown_timeout_within_the_grace_period_logs_nothing(
    caplog: pytest.LogCaptureFixture, grace: int | None
) -> None:
    """No --timeout-graceful-shutdown, or one at least shutdown_timeout: no warning."""
    with running(_app(shutdown_timeout=10), timeout_graceful_shutdown=grace) as url:
        assert httpx.get(url).json() == "db"
    assert not _warnings(caplog)
