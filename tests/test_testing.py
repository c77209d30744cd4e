"""The pytest plugin's once_reset fixture and the override() helper."""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from fastapi_once import once
from fastapi_once._loops import forget_everything
from fastapi_once.testing import override

# This suite runs with the entry point off (-p no:fastapi_once, see pyproject.toml); the plugin is
# loaded here by module name, as a project that turned automatic loading off would load it.
pytest_plugins = ["pytester", "fastapi_once.pytest_plugin"]

# The pytester runs below happen in this process (pytest's own plugins and the entry points are
# loaded afresh for each, -p no:fastapi_once included), not in a subprocess that would import
# and assertion-rewrite every plugin's package again. Hypothesis's plugin is left out: none of
# these runs uses it, and its summary would import all of hypothesis inside the run, which
# pytester then unloads again.
INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

#: A module-level once that the in-process once_reset test makes and expects cleaned up.
cleanups: list[str] = []


@once
async def resource_with_cleanup() -> AsyncIterator[str]:
    cleanups.append("made")
    yield "value"
    cleanups.append("cleaned")


@pytest.fixture
def loop_checked_after_once_reset() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop for the test. Set up before once_reset, so torn down after it: sees what its
    teardown did, then closes the loop."""
    cleanups.clear()
    loop = asyncio.new_event_loop()
    yield loop
    try:
        assert cleanups == ["made", "cleaned"]
    finally:
        loop.close()


# Fixtures are set up in the order listed and torn down in reverse: once_reset's teardown runs
# first, then the loop fixture's checks it.
@pytest.mark.usefixtures("loop_checked_after_once_reset", "once_reset")
def test_once_reset_cleans_up_after_the_test(request: pytest.FixtureRequest) -> None:
    """The fixture's teardown runs the cleanup of a value the test made."""
    loop = request.getfixturevalue("loop_checked_after_once_reset")
    assert loop.run_until_complete(resource_with_cleanup()) == "value"
    assert cleanups == ["made"]


def test_the_entry_point_loads_the_plugin_module() -> None:
    """pytest11's fastapi_once entry point names fastapi_once.pytest_plugin."""
    (entry,) = [
        entry
        for entry in importlib.metadata.entry_points(group="pytest11")
        if entry.name == "fastapi_once"
    ]
    assert entry.value == "fastapi_once.pytest_plugin"
    assert hasattr(entry.load(), "once_reset")


def test_override_works_without_pytest() -> None:
    """fastapi_once.testing imports no pytest: override() works where pytest cannot be imported."""
    script = textwrap.dedent(
        """
        import sys

        sys.modules["pytest"] = None  # any "import pytest" now raises ImportError

        import anyio

        from fastapi_once import once
        from fastapi_once.testing import override


        @once
        async def get_db():
            return "real"


        async def main():
            async with override(get_db, "fake"):
                assert await get_db() == "fake"
            assert await get_db() == "real"


        anyio.run(main)
        assert sys.modules["pytest"] is None
        print("ok")
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "ok\n"


def test_the_plugin_is_off_with_p_no_fastapi_once(pytester: pytest.Pytester) -> None:
    """-p no:fastapi_once turns the plugin off: once_reset is then an unknown fixture."""
    pytester.makepyfile(
        """
        def test_uses_it(once_reset):
            pass
        """
    )
    result = pytester.runpytest_inprocess(*INNER, "-p", "no:fastapi_once")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'once_reset' not found*"])


def test_the_plugin_can_be_loaded_by_name_when_turned_off(pytester: pytest.Pytester) -> None:
    """With the entry point off, pytest_plugins in the root conftest.py brings once_reset back."""
    pytester.makeconftest('pytest_plugins = ["fastapi_once.pytest_plugin"]')
    pytester.makepyfile(
        """
        def test_uses_it(once_reset):
            pass
        """
    )
    result = pytester.runpytest_inprocess(*INNER, "-p", "no:fastapi_once")
    result.assert_outcomes(passed=1)


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
    result = pytester.runpytest_inprocess(*INNER)
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


def test_once_reset_from_fastapi_once_testing_is_deprecated_but_still_the_fixture() -> None:
    """0.1's import keeps working through 0.2, warning at the importing line."""
    import fastapi_once.pytest_plugin

    with pytest.warns(DeprecationWarning, match=r"deprecated since 0\.2.*removed in 0\.3") as seen:
        from fastapi_once.testing import once_reset
    assert once_reset is fastapi_once.pytest_plugin.once_reset
    assert [w.filename for w in seen] == [__file__]
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        fastapi_once.testing.nothing  # type: ignore[attr-defined]  # noqa: B018


def test_a_conftest_that_imports_once_reset_the_old_way_still_runs(
    pytester: pytest.Pytester,
) -> None:
    """A 0.1 conftest (`from fastapi_once.testing import once_reset`) gets the fixture."""
    pytester.makeconftest("from fastapi_once.testing import once_reset  # noqa: F401")
    pytester.makepyfile(
        """
        def test_uses_it(once_reset):
            pass
        """
    )
    result = pytester.runpytest_inprocess(*INNER, "-p", "no:fastapi_once")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*DeprecationWarning: fastapi_once.testing.once_reset*"])
