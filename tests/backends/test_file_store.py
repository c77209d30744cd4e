"""The file backend passes the store contract (two backends in one process stand for two
processes: each claim opens its own file, and flock locks belong to open files)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from store_contract import StoreContract, StoreKit

from fastapi_once.backends import FileLockBackend


class TestFileStore(StoreContract):
    @pytest.fixture
    async def kit(self, tmp_path: Path) -> AsyncIterator[StoreKit]:
        directory = tmp_path / "locks"
        async with StoreKit.closing(
            lambda: FileLockBackend(directory), leases_expire=False, fenced=False
        ) as kit:
            yield kit
