"""Keyed onces: one value per key, bounded by an LRU of maxsize."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from timekeeping import wait_until

from fastapi_once import once

pytestmark = pytest.mark.anyio


async def test_each_key_gets_its_own_value_made_once() -> None:
    """Concurrent callers per key share one attempt per key."""
    runs: list[str] = []

    @once(key=lambda url: url)
    async def get_stuff(url: str) -> str:
        runs.append(url)
        await anyio.sleep(0.01)
        return f"stuff from {url}"

    results: dict[str, list[str]] = {"/a": [], "/b": []}

    async def caller(url: str) -> None:
        results[url].append(await get_stuff(url))

    async with anyio.create_task_group() as group:
        for i in range(200):
            group.start_soon(caller, "/a" if i % 2 else "/b")
    assert sorted(runs) == ["/a", "/b"]
    assert results["/a"] == ["stuff from /a"] * 100
    assert results["/b"] == ["stuff from /b"] * 100


async def test_the_key_function_decides_which_calls_share_a_value() -> None:
    """Calls whose key is equal share a value even with different arguments."""

    @once(key=lambda url: url.lower())
    async def get_stuff(url: str) -> str:
        return url

    assert await get_stuff("/A") == "/A"
    assert await get_stuff("/a") == "/A"


async def test_least_recently_used_values_are_evicted_beyond_maxsize() -> None:
    """maxsize bounds the values kept; the least recently used one goes first."""
    runs: list[int] = []

    @once(key=lambda n: n, maxsize=2)
    async def square(n: int) -> int:
        runs.append(n)
        return n * n

    await square(1)
    await square(2)
    await square(1)  # 1 is now the most recently used
    await square(3)  # evicts 2
    await square(1)
    await square(2)  # made again
    assert runs == [1, 2, 3, 2]


async def test_an_evicted_value_is_cleaned_up() -> None:
    """The cleanup of an evicted generator value runs."""
    closed: list[int] = []
    done = anyio.Event()

    @once(key=lambda n: n, maxsize=1)
    async def connect(n: int) -> AsyncIterator[int]:
        yield n
        closed.append(n)
        done.set()

    await connect(1)
    await connect(2)
    with anyio.fail_after(5):
        await done.wait()
    assert closed == [1]


async def test_reset_cleans_up_every_key_newest_first() -> None:
    """reset() on a keyed once forgets and cleans up all its values, newest first."""
    closed: list[int] = []

    @once(key=lambda n: n)
    async def connect(n: int) -> AsyncIterator[int]:
        yield n
        closed.append(n)

    for n in range(3):
        await connect(n)
    await connect.reset()
    assert closed == [2, 1, 0]


async def test_an_unhashable_key_names_the_parameter_and_suggests_key() -> None:
    """A key that cannot be hashed is a TypeError naming the parameter and the fix."""

    @once(key=lambda tags: tags)
    async def search(tags: list[str]) -> int:
        return len(tags)

    with pytest.raises(TypeError, match=r"unhashable list \(parameter 'tags'\).*key="):
        await search(["a", "b"])


async def test_an_unhashable_key_from_hashable_arguments_is_explained() -> None:
    """A key function that builds an unhashable key is told so, without blaming a parameter."""

    @once(key=lambda url: [url])
    async def get_stuff(url: str) -> str:
        return url

    with pytest.raises(TypeError, match=r"key of .*get_stuff is an unhashable list; pass key="):
        await get_stuff("/a")


async def test_the_key_none_is_refreshed_evicted_and_reset_like_any_other_key() -> None:
    """key None (an optional query parameter) is an ordinary key: every retired value is cleaned."""
    made: list[str | None] = []
    closed: list[str | None] = []

    @once(key=lambda q: q, maxsize=2, refresh=0.01, ttl=60)
    async def search(q: str | None = None) -> AsyncIterator[str]:
        made.append(q)
        yield f"results for {q}"
        closed.append(q)

    assert await search(None) == "results for None"
    await anyio.sleep(0.02)
    assert await search(None) == "results for None"  # due: one refresh replaces it
    await wait_until(lambda: closed == [None])  # the replaced None value is cleaned up
    assert await search("a") == "results for a"
    assert await search("b") == "results for b"  # evicts the least recent: None
    await wait_until(lambda: closed == [None, None])
    assert await search(None) == "results for None"  # made again, evicting "a"
    await search.reset()
    assert sorted(closed, key=str) == sorted([None, None, "a", "b", None], key=str)
    assert made.count(None) == 3


async def test_reset_with_arguments_resets_only_that_key() -> None:
    """reset(url) cleans up and forgets one key's value; the others stay."""
    closed: list[str] = []

    @once(key=lambda url: url)
    async def get_stuff(url: str) -> AsyncIterator[str]:
        yield url
        closed.append(url)

    await get_stuff("/a")
    await get_stuff("/b")
    await get_stuff.reset("/a")
    assert closed == ["/a"]
    keys = get_stuff.status().keys
    assert keys is not None
    assert keys["ready"] == 1
    await get_stuff.reset("/never-made")  # nothing to do
    assert closed == ["/a"]

    @once
    async def plain() -> int:
        return 1

    with pytest.raises(TypeError, match="only for a keyed once"):
        await plain.reset("x")  # type: ignore[call-arg]
