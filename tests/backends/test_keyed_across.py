"""The wiring of a keyed once with ``across=``: what reaches the backend, and what is refused."""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from fastapi_once import once
from fastapi_once._keys import key_digest, shared_key_digest
from fastapi_once.backends import Backend

pytestmark = pytest.mark.anyio


class KeyedMemoryBackend(Backend):
    """Keeps keyed records in a dict (one "process"), recording every call it gets."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], str] = {}
        self.calls: list[dict[str, Any]] = []
        self.resets: list[tuple[str, str | None]] = []

    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        raise AssertionError("a keyed once must call run_keyed")

    async def run_keyed(
        self,
        name: str,
        key: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        cooldown: float | None = None,
        refresh: float | None = None,
    ) -> Any:
        self.calls.append(
            {"name": name, "key": key, "ttl": ttl, "cooldown": cooldown, "refresh": refresh}
        )
        if (name, key) not in self.records:
            self.records[name, key] = json.dumps(await work())
        return json.loads(self.records[name, key])

    async def reset(self, name: str) -> None:
        raise AssertionError("a keyed once must call reset_keyed")

    async def reset_keyed(self, name: str, key: str | None) -> None:
        self.resets.append((name, key))

    def describe(self) -> str:
        return "memory"


async def test_each_key_reaches_the_backend_by_its_digest_with_the_onces_timings(
    anyio_backend: str,
) -> None:
    """run_keyed gets the once's name, the key's 40-digit digest (never the key), ttl,
    cooldown and refresh; concurrent callers of one key make one backend call."""
    backend = KeyedMemoryBackend()
    name = f"tests.keyed.digest.{anyio_backend}"

    async def get_stuff(url: str) -> str:
        await anyio.sleep(0.01)
        return f"fetched {url}"

    stuff = once(
        get_stuff, key=lambda url: url, ttl=60, refresh=30, cooldown=5, across=backend, name=name
    )
    async with anyio.create_task_group() as tg:
        for url in ["/a", "/b"] * 10:
            tg.start_soon(stuff, url)
    assert sorted(c["key"] for c in backend.calls) == sorted(
        [shared_key_digest(name, "/a"), shared_key_digest(name, "/b")]
    )
    assert {(c["name"], c["ttl"], c["cooldown"], c["refresh"]) for c in backend.calls} == {
        (name, 60, 5, 30)
    }
    assert all("/a" not in c["key"] and len(c["key"]) == 40 for c in backend.calls)


async def test_a_warm_key_is_served_from_memory_without_a_backend_call(anyio_backend: str) -> None:
    """The in-process value comes first: a second call of a key makes no backend call."""
    backend = KeyedMemoryBackend()

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(
        get_stuff, key=lambda url: url, ttl=60, across=backend, name=f"t.warm.{anyio_backend}"
    )
    assert await stuff("/a") == "/a"
    assert await stuff("/a") == "/a"
    assert len(backend.calls) == 1


async def test_a_keyed_value_comes_back_as_the_annotated_type(anyio_backend: str) -> None:
    """The shared JSON is decoded into the return annotation, for keyed values too."""
    backend = KeyedMemoryBackend()

    async def when(day: int) -> tuple[int, datetime.date]:
        return day, datetime.date(2026, 11, day)

    stuff = once(when, key=lambda day: day, ttl=60, across=backend, name=f"t.typed.{anyio_backend}")
    assert await stuff(25) == (25, datetime.date(2026, 11, 25))
    assert next(iter(backend.records.values())) == '[25, "2026-11-25"]'


async def test_reset_with_a_key_clears_that_keys_record_and_without_clears_every_key(
    anyio_backend: str,
) -> None:
    """reset(url) asks the backend to delete that key's record by digest; reset() every key's."""
    backend = KeyedMemoryBackend()
    name = f"tests.keyed.reset.{anyio_backend}"

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=backend, name=name)
    await stuff("/a")
    await stuff.reset("/a")
    await stuff.reset()
    assert backend.resets == [(name, shared_key_digest(name, "/a")), (name, None)]


def test_a_keyed_once_across_processes_without_ttl_is_refused() -> None:
    """Keys come from requests: without ttl= the backend's records would grow without bound."""

    async def get_stuff(url: str) -> str:
        return url

    with pytest.raises(TypeError, match=r"keyed once across processes needs ttl=.*ttl=60"):
        once(get_stuff, key=lambda url: url, across=KeyedMemoryBackend(), name="t.nottl")


@pytest.mark.parametrize(
    "across",
    [
        "redis://127.0.0.1:1/0",
        "postgresql://app@127.0.0.1:1/app",
        "RedisBackend",
        "PostgresBackend",
    ],
)
def test_keyed_across_on_redis_and_postgres_without_ttl_is_refused_when_the_once_is_made(
    across: str,
) -> None:
    """The same refusal for the real backends, as objects or URLs; nothing is connected."""
    from backend_servers import require

    if across == "RedisBackend":
        require("redis")
        from fastapi_once.backends import RedisBackend

        backend: object = RedisBackend("redis://127.0.0.1:1/0")
    elif across == "PostgresBackend":
        require("asyncpg")
        from fastapi_once.backends import PostgresBackend

        backend = PostgresBackend("postgresql://app@127.0.0.1:1/app")
    else:
        backend = across

    async def get_stuff(url: str) -> str:
        return url  # pragma: no cover

    with pytest.raises(TypeError, match="needs ttl="):
        once(get_stuff, key=lambda url: url, across=backend, name="t.nottl.real")  # type: ignore[call-overload]


async def test_a_factory_building_a_backend_without_keyed_records_fails_at_first_call(
    tmp_path: Path, anyio_backend: str
) -> None:
    """Known only when the factory runs: the first call raises the backend's refusal."""

    async def get_stuff(url: str) -> str:
        return url

    class UnkeyedOnly(Backend):  # a user's backend that keeps no keyed records
        async def run_once(self, name: str, work: Any, *, ttl: float | None = None) -> Any:
            return await work()

        async def reset(self, name: str) -> None:
            pass

        def describe(self) -> str:
            return "UnkeyedOnly"

    def factory() -> Backend:
        return UnkeyedOnly()

    stuff = once(get_stuff, key=lambda u: u, ttl=60, across=factory, name=f"t.f.{anyio_backend}")
    with pytest.raises(TypeError, match="does not share keyed values"):
        await stuff("/a")


async def test_a_key_whose_text_differs_between_processes_is_refused(anyio_backend: str) -> None:
    """A key must be plain data (str, bytes, numbers, None, tuples): an object's repr has its
    address, a set's its hash order, so processes would not agree on its name."""
    backend = KeyedMemoryBackend()

    async def get_stuff(url: object) -> str:
        return "x"

    stuff = once(
        get_stuff, key=lambda url: url, ttl=60, across=backend, name=f"t.key.{anyio_backend}"
    )
    with pytest.raises(TypeError, match=r"key of t\.key\..* is a frozenset.*tuple of them"):
        await stuff(frozenset({"a"}))
    assert await stuff(("a", 1, None, b"x", 2.5, True)) == "x"
    assert backend.calls[0]["key"].startswith(key_digest(("a", 1, None, b"x", 2.5, True)))


def test_a_cooldown_read_from_another_process_ends_with_it_here_too() -> None:
    """OnceCoolingDownError with 2 s left fails calls fast for 2 s here, not a whole cooldown."""
    from fastapi_once._policy import Policy
    from fastapi_once.backends import OnceCoolingDownError

    policy = Policy(cooldown=30)
    assert policy.cooldown_until(100.0, OnceCoolingDownError("t[#1]", 2.0)) == 102.0
    assert policy.cooldown_until(100.0, RuntimeError("own failure")) == 130.0
