"""The concurrency scenarios under many orders of ready callbacks (one seed, one order).

A failing seed is in the test id, so ``pytest -k 'seed-17'`` replays it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from shuffled import run_shuffled

from fastapi_once import once, reset_all

SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_a_cold_burst_runs_fn_once(seed: int) -> None:
    """100 concurrent cold callers: one run, one value, in every order."""
    runs: list[int] = []

    @once
    async def load() -> object:
        runs.append(1)
        await asyncio.sleep(0)
        return object()

    async def main() -> list[object]:
        return await asyncio.gather(*(load() for _ in range(100)))

    values = run_shuffled(main, seed)
    assert len(runs) == 1
    assert len({id(v) for v in values}) == 1


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_cancelling_the_starter_keeps_the_work_for_the_others(seed: int) -> None:
    """The first caller is cancelled mid-wait; the others get the one value."""
    runs: list[int] = []

    @once
    async def load() -> str:
        runs.append(1)
        await asyncio.sleep(0.001)
        return "value"

    async def main() -> list[str]:
        starter = asyncio.ensure_future(load())
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(load()) for _ in range(20)]
        starter.cancel()
        return list(await asyncio.gather(*others))

    assert run_shuffled(main, seed) == ["value"] * 20
    assert len(runs) == 1


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_a_failing_attempt_is_shared_then_retried(seed: int) -> None:
    """Every waiter of the failing attempt gets its error; the next call starts a new run."""
    runs: list[int] = []

    @once
    async def load() -> str:
        runs.append(1)
        await asyncio.sleep(0)
        if len(runs) == 1:
            raise ConnectionError("down")
        return "value"

    async def main() -> tuple[list[object], str]:
        first = await asyncio.gather(*(load() for _ in range(30)), return_exceptions=True)
        return list(first), await load()

    first, again = run_shuffled(main, seed)
    assert all(isinstance(r, ConnectionError) for r in first)
    assert len({id(r) for r in first}) == 1
    assert again == "value"
    assert len(runs) == 2


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_reset_during_a_refresh_cleans_up_every_value_once(seed: int) -> None:
    """Refresh in flight, callers around it, reset: each value made is cleaned up exactly once."""
    made: list[int] = []
    cleaned: list[int] = []

    @once(refresh=0.001, ttl=60)
    async def load() -> AsyncIterator[int]:
        made.append(len(made) + 1)
        n = made[-1]
        await asyncio.sleep(0.002)
        yield n
        await asyncio.sleep(0)
        cleaned.append(n)

    async def main() -> None:
        await load()
        await asyncio.sleep(0.002)
        callers = [asyncio.ensure_future(load()) for _ in range(10)]  # one starts the refresh
        await asyncio.sleep(0)
        await asyncio.gather(load.reset(), *callers)
        await reset_all()
        assert sorted(cleaned) == sorted(made)

    run_shuffled(main, seed)
    assert sorted(cleaned) == sorted(made)
    assert len(set(cleaned)) == len(cleaned)
