"""Parameter checks and sub-dependencies work with postponed (string) annotations."""

from __future__ import annotations

from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from fastapi_once import once

pytestmark = pytest.mark.anyio


def get_settings() -> dict[str, str]:
    return {"name": "settings"}


async def get_db(settings: Annotated[dict[str, str], Depends(get_settings)]) -> str:
    return f"db with {settings['name']}"


async def needs_request(request: Request) -> str:
    return str(request.url)


async def get_stuff(url: str) -> str:
    return url


def test_a_request_parameter_is_refused_with_string_annotations() -> None:
    """The Request check sees through postponed annotations."""
    with pytest.raises(TypeError, match="parameter 'request' is a Request"):
        once(needs_request)


def test_request_data_is_refused_with_string_annotations() -> None:
    """The request-data check sees through postponed annotations."""
    with pytest.raises(TypeError, match="request data"):
        once(get_stuff)


db = once(get_db)
app = FastAPI()


@app.get("/")
async def root(value: Annotated[str, Depends(db)]) -> str:
    return value


async def test_sub_dependencies_resolve_with_string_annotations() -> None:
    """Annotated[..., Depends()] given as a string is resolved once."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as http:
        assert (await http.get("/")).json() == "db with settings"
    await db.reset()
