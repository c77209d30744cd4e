"""The app that uvicorn serves in scenario 4: the same route with the baseline and with once."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from fastapi_once import once

from .hot_path import SETTINGS, Settings

app = FastAPI()


async def get_settings() -> Settings:
    return SETTINGS


@once
async def get_settings_once() -> Settings:
    return Settings()


@app.get("/plain")
async def plain(settings: Settings = Depends(get_settings)) -> dict[str, str]:
    return {"name": settings.name}


@app.get("/once")
async def with_once(settings: Settings = Depends(get_settings_once)) -> dict[str, str]:
    return {"name": settings.name}
