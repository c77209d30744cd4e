"""The across= wiring, with an in-memory backend: in-process single-flight comes first."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from fastapi_once import once
from fastapi_once.backends import Backend

pytestmark = pytest.mark.anyio


class MemoryBackend(Backend):
    """Records results in a dict: one "process" only, enough to test the wiring."""

    def __init__(self) -> None:
        self.results: dict[str, str] = {}
        self.calls: list[tuple[str, float | None]] = []

    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        self.calls.append((name, ttl))
        if name not in self.results:
            self.results[name] = json.dumps(await work())
        return json.loads(self.results[name])

    async def reset(self, name: str) -> None:
        self.results.pop(name, None)

    def describe(self) -> str:
        return "memory"


async def test_concurrent_callers_in_one_process_share_one_backend_call() -> None:
    """Many callers: one run_once call, named by name@version, with the once's ttl."""
    backend = MemoryBackend()
    runs = 0

    @once(across=backend, name="migrate", version=2, ttl=60)
    async def migrate() -> dict[str, int]:
        nonlocal runs
        runs += 1
        await anyio.sleep(0.01)
        return {"applied": 3}

    results: list[object] = []

    async def caller() -> None:
        results.append(await migrate())

    async with anyio.create_task_group() as group:
        for _ in range(100):
            group.start_soon(caller)
    assert results == [{"applied": 3}] * 100
    assert backend.calls == [("migrate@2", 60)]
    assert runs == 1


async def test_a_result_recorded_by_another_process_is_returned_without_running() -> None:
    """When the backend already has the result, fn does not run here."""
    backend = MemoryBackend()
    backend.results["seed"] = json.dumps("done elsewhere")

    @once(across=backend, name="seed")
    def seed() -> str:
        raise AssertionError("ran although another process had done it")  # pragma: no cover

    assert await seed() == "done elsewhere"


async def test_reset_clears_the_backends_record_so_every_process_runs_it_again() -> None:
    """o.reset() forgets the value here and the marker in the backend."""
    backend = MemoryBackend()
    runs = 0

    @once(across=backend, name="seed-reset")
    async def seed() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await seed() == 1
    await seed.reset()
    assert backend.results == {}
    assert await seed() == 2


async def test_reset_all_keeps_the_backends_record() -> None:
    """Shutting one process down (reset_all) must not make the work run again elsewhere."""
    from fastapi_once import reset_all

    backend = MemoryBackend()

    @once(across=backend, name="seed-keep")
    async def seed() -> str:
        return "seeded"

    await seed()
    await reset_all()
    assert backend.results == {"seed-keep": '"seeded"'}


async def test_reset_clears_the_record_even_when_this_loop_never_made_the_value() -> None:
    """A reset from a process (or loop) that never called the once still reaches the backend."""
    backend = MemoryBackend()
    backend.results["admin.job"] = json.dumps({"done": True})

    @once(across=backend, name="admin.job")
    async def job() -> dict[str, bool]:
        return {"done": False}

    await job.reset()
    assert backend.results == {}
    assert await job() == {"done": False}
