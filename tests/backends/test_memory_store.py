"""The in-memory store passes the store contract (on asyncio in real time, on trio in mock time)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from memory_store import MemoryServer, MemoryStore
from store_contract import StoreContract, StoreKit


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """asyncio in real time; trio with a clock that jumps over every sleep."""
    if request.param == "trio":
        import trio.testing

        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return "asyncio"


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def kit(self) -> AsyncIterator[StoreKit]:
        server = MemoryServer()
        async with StoreKit.closing(lambda: MemoryStore(server)) as kit:
            yield kit
