"""Shared fixtures: every anyio test runs on asyncio and on trio."""

from __future__ import annotations

import pytest
from timekeeping import FakeClock


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each ``@pytest.mark.anyio`` test on both backends."""
    return str(request.param)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the clock of expiry, refresh and cooldown with one the test moves."""
    from fastapi_once import _core, _records

    fake = FakeClock()
    monkeypatch.setattr(_core, "monotonic", fake)
    monkeypatch.setattr(_records, "monotonic", fake)
    return fake
