"""RedisBackend's own behaviour: the lease, its renewal and loss, fencing tokens, outages."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from backend_servers import RedisServer, free_port, require

from fastapi_once.backends import BackendError, LeaseLostError, fencing_token

redis_asyncio = require("redis.asyncio")
from fastapi_once.backends import RedisBackend  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio is asyncio-only."""
    return "asyncio"


@pytest.fixture
def namespace() -> str:
    return "t" + secrets.token_hex(6)


@pytest.fixture
def name() -> str:
    return f"tests.redis.job@{secrets.token_hex(4)}"


@pytest.fixture
async def side(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain client, to look at and tamper with the keys behind the backend's back."""
    client = redis_asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def make(
    redis_server: RedisServer, namespace: str
) -> AsyncIterator[Callable[..., RedisBackend]]:
    """Build RedisBackends on the test server; they are closed on the test's event loop."""
    made: list[RedisBackend] = []

    def make(**options: Any) -> RedisBackend:
        backend = RedisBackend(redis_server.url, namespace=namespace, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def nothing() -> None:
    pass


def keys(namespace: str, name: str) -> dict[str, str]:
    return {what: f"{namespace}:{{{name}}}:{what}" for what in ("done", "lock", "fence")}


async def test_the_lease_is_renewed_while_the_work_runs_past_it(
    make: Callable[..., RedisBackend], side: Any, namespace: str, name: str
) -> None:
    """Work three times longer than the lease keeps the lock; a follower waits, never runs."""
    leader, follower = make(lease=0.3), make(lease=0.3)
    seen: dict[str, Any] = {}
    started = anyio.Event()

    async def long_work() -> str:
        started.set()
        await anyio.sleep(0.9)
        seen["ttl_ms"] = await side.pttl(keys(namespace, name)["lock"])
        return "finished"

    async def never() -> str:
        raise AssertionError("the follower ran the work while the leader held the lock")

    results: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def lead() -> None:
            results.append(await leader.run_once(name, long_work))

        tg.start_soon(lead)
        await started.wait()
        results.append(await follower.run_once(name, never))
    assert results == ["finished", "finished"]
    assert 0 < seen["ttl_ms"] <= 300
    assert await side.exists(keys(namespace, name)["lock"]) == 0


async def test_a_deleted_lock_cancels_the_leaders_work_and_records_nothing(
    make: Callable[..., RedisBackend], side: Any, namespace: str, name: str
) -> None:
    """Renewal finds the lock gone: the work is cancelled and LeaseLostError says why."""
    backend = make(lease=0.3)
    cancelled = False

    async def work() -> str:
        nonlocal cancelled
        await side.delete(keys(namespace, name)["lock"])
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise
        return "never"

    with anyio.fail_after(5), pytest.raises(LeaseLostError) as info:
        await backend.run_once(name, work)
    assert cancelled
    assert await side.get(keys(namespace, name)["done"]) is None
    message = str(info.value)
    assert name in message
    assert backend.describe() in message
    assert "another process took it" in message


async def test_a_paused_leader_is_superseded_and_its_result_refused(
    make: Callable[..., RedisBackend], side: Any, namespace: str, name: str
) -> None:
    """A leader whose renewal stalls outlives its lease: a second leader with a larger fencing
    token runs the work, and the first one's result is refused (LeaseLostError)."""
    paused, other = make(lease=0.2), make(lease=0.2)
    client = paused._client()

    async def stalled_renewal(**_: Any) -> int:
        return 1  # claims success without extending the lease, like a paused process

    client.renew = stalled_renewal  # type: ignore[assignment]
    tokens: dict[str, int | None] = {}
    started = anyio.Event()

    async def slow() -> str:
        tokens["first"] = fencing_token()
        started.set()
        await anyio.sleep(0.8)
        return "first"

    async def quick() -> str:
        tokens["second"] = fencing_token()
        return "second"

    results: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:

        async def lead() -> None:
            with pytest.raises(LeaseLostError, match="expired or another process took it"):
                await paused.run_once(name, slow)

        tg.start_soon(lead)
        await started.wait()
        results["other"] = await other.run_once(name, quick)
    assert results == {"other": "second"}
    first, second = tokens["first"], tokens["second"]
    assert first is not None
    assert second is not None
    assert second > first
    assert await paused.run_once(name, slow) == "second"


async def test_the_fencing_token_is_set_only_inside_the_work_and_grows_with_each_leader(
    make: Callable[..., RedisBackend], name: str
) -> None:
    """fencing_token() is None outside the work; each new leader draws a larger one."""
    backend = make()
    tokens: list[int | None] = []

    async def work() -> None:
        tokens.append(fencing_token())

    assert fencing_token() is None
    await backend.run_once(name, work)
    await backend.reset(name)
    await backend.run_once(name, work)
    assert fencing_token() is None
    first, second = tokens
    assert isinstance(first, int)
    assert isinstance(second, int)
    assert second > first


async def test_an_unreachable_redis_raises_backend_error_without_the_password(name: str) -> None:
    """The URL's password is masked in the error; the driver's exception is the cause."""
    backend = RedisBackend(f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", lease=0.5)
    with anyio.fail_after(10), pytest.raises(BackendError) as info:
        await backend.run_once(name, nothing)
    assert "hunter2secret" not in str(info.value)
    assert "redis://:***@127.0.0.1" in str(info.value)
    assert info.value.__cause__ is not None
    await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_redis_backend_refuses_trio_clearly(redis_server: RedisServer, name: str) -> None:
    """redis.asyncio needs asyncio: on trio the error says so and points to FileLockBackend."""
    backend = RedisBackend(redis_server.url)
    with pytest.raises(RuntimeError, match="asyncio only"):
        await backend.run_once(name, nothing)


def test_options_are_checked() -> None:
    """A bad option is a ValueError naming it."""
    with pytest.raises(ValueError, match="lease=0"):
        RedisBackend(lease=0)
    with pytest.raises(ValueError, match="namespace"):
        RedisBackend(namespace="")


async def test_names_with_braces_and_percent_signs_never_share_keys(
    make: Callable[..., RedisBackend], side: Any, namespace: str
) -> None:
    """Braces are percent-encoded in the hash tag: each name has its own keys, one slot."""
    backend = make()
    names = ["a}:{b", "a%7D:%7Bb", "{a}", "%7Ba%7D"]
    for i, name in enumerate(names):

        async def work(i: int = i) -> int:
            return i

        assert await backend.run_once(name, work) == i
    done = sorted(await side.keys(f"{namespace}:*:done"))
    assert len(done) == 4
    for key in done:
        tag = key[key.index("{") + 1 : key.index("}")]
        assert key == f"{namespace}:{{{tag}}}:done"


def test_a_namespace_with_braces_is_refused() -> None:
    """A brace in the namespace would make keys ambiguous (and move the hash tag)."""
    with pytest.raises(ValueError, match="without braces"):
        RedisBackend(namespace="app:{x}")


def test_a_percent_encoded_password_is_masked_as_written_and_decoded() -> None:
    """The one scrubber masks the password in both spellings."""
    from fastapi_once.backends._base import Scrubber

    scrub = Scrubber("redis://:p%40ss%3Aword@cache:6379/0")
    assert scrub.shown == "redis://:***@cache:6379/0"
    assert scrub("AuthenticationError: p@ss:word refused") == "AuthenticationError: *** refused"
    assert "p%40ss" not in scrub("bad url redis://:p%40ss%3Aword@cache")
