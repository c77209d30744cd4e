"""Where the 0.3 features meet: the 503 handler, the options module, the first-hour errors."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI

from fastapi_once import once, once_lifespan


async def _status_after_shutdown(app: FastAPI, path: str) -> tuple[int, str | None]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        async with LifespanManager(app):
            pass  # started, then shut down: the loop's onces are closed
        response = await http.get(path)
    return response.status_code, response.headers.get("retry-after")


@pytest.mark.anyio
async def test_a_mounted_sub_apps_request_after_shutdown_began_gets_503() -> None:
    """A FastAPI app mounted under the app whose lifespan is once_lifespan answers 503 too."""

    @once(name="meetings.mounted.db")
    async def get_db() -> str:
        return "db"

    sub = FastAPI()

    @sub.get("/x")
    async def x(db: str = Depends(get_db)) -> str:
        return db

    app = FastAPI(lifespan=once_lifespan())
    app.mount("/sub", sub)
    assert await _status_after_shutdown(app, "/sub/x") == (503, "1")


@pytest.mark.anyio
async def test_a_mounted_sub_apps_own_handler_for_once_errors_is_kept() -> None:
    """A sub-app that handles OnceError itself keeps its handler; the outer app gets the 503."""
    from fastapi import Request
    from fastapi.responses import PlainTextResponse

    from fastapi_once import OnceError

    @once(name="meetings.mounted.own")
    async def get_db() -> str:
        return "db"

    sub = FastAPI()

    async def mine(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("mine", status_code=418)

    sub.add_exception_handler(OnceError, mine)

    @sub.get("/x")
    async def x(db: str = Depends(get_db)) -> str:
        return db

    app = FastAPI(lifespan=once_lifespan())

    @app.get("/y")
    async def y(db: str = Depends(get_db)) -> str:
        return db

    app.mount("/sub", sub)
    assert await _status_after_shutdown(app, "/sub/x") == (418, None)
    assert await _status_after_shutdown(app, "/y") == (503, "1")


def test_a_version_too_long_to_write_is_refused_naming_the_option() -> None:
    """version=10**5000 (more digits than Python writes as text) is a ValueError naming the once
    and the option, not a bare conversion error."""

    async def fn() -> int:
        return 1

    with pytest.raises(ValueError, match=r"once\(.*fn, version=<an integer of 5001 digits>\)"):
        once(fn, version=10**5000)
