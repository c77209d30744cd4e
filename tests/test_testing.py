"""The pytest plugin's once_reset fixture and the override() helper."""

from __future__ import annotations

import anyio
import pytest

from fastapi_once import once
from fastapi_once._loops import forget_everything
from fastapi_once.testing import override

pytest_plugins = ["pytester"]


def test_the_once_reset_fixture_forgets_values_between_tests(pytester: pytest.Pytester) -> None:
    """With once_reset, each test starts with no value and the cleanup ran."""
    pytester.makepyfile(
        """
        import asyncio
        import pytest
        from fastapi_once import once

        log = []

        @once
        async def resource():
            log.append("made")
            yield len(log)
            log.append("cleaned")

        @pytest.fixture
        def loop():
            loop = asyncio.new_event_loop()
            yield loop
            loop.close()

        @pytest.mark.usefixtures("once_reset")
        def test_one(loop):
            loop.run_until_complete(resource())

        @pytest.mark.usefixtures("once_reset")
        def test_two(loop):
            loop.run_until_complete(resource())
            assert log == ["made", "cleaned", "made"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_forget_everything_refuses_to_run_inside_a_loop() -> None:
    """Inside a running loop the async reset_all() is the one to use."""

    async def main() -> None:
        forget_everything()

    with pytest.raises(RuntimeError, match="reset_all"):
        anyio.run(main)


@pytest.mark.anyio
async def test_override_swaps_the_value_inside_the_block() -> None:
    """override(o, value): o returns value inside the block, its own value after."""
    runs = 0

    @once
    async def get_db() -> str:
        nonlocal runs
        runs += 1
        return "real"

    async with override(get_db, "fake") as value:
        assert value == "fake"
        assert await get_db() == "fake"
    assert await get_db() == "real"
    assert runs == 1


@pytest.mark.anyio
async def test_a_keyed_once_cannot_be_overridden_whole() -> None:
    """override() of a keyed once is a TypeError."""

    @once(key=lambda url: url)
    async def get_stuff(url: str) -> str:
        return url

    with pytest.raises(TypeError, match="keyed"):
        async with override(get_stuff, "x"):
            pass  # pragma: no cover


def test_forget_everything_cleans_up_values_of_finished_loops() -> None:
    """Values made in loops that have ended are forgotten and their cleanups run."""
    import asyncio
    from collections.abc import AsyncIterator

    log: list[str] = []

    @once
    async def resource() -> AsyncIterator[int]:
        log.append("made")
        yield len(log)
        log.append("cleaned")

    async def use() -> int:
        return await resource()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(use()) == 1
        forget_everything()
        assert log == ["made", "cleaned"]
        assert loop.run_until_complete(use()) == 3
    finally:
        forget_everything()
        loop.close()


@pytest.mark.anyio
async def test_override_ends_cleanly_if_the_value_was_replaced_inside() -> None:
    """A reset inside the block does not make the exit fail."""

    @once
    async def get_db() -> str:
        return "real"

    async with override(get_db, "fake"):
        await get_db.reset()
        assert await get_db() == "real"
    assert await get_db() == "real"
