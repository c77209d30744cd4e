"""RedisBackend on a real redis-server: the store contract, and what is Redis's own (its
connections, a stalled server, its URL, keys and listener)."""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from backend_servers import RedisServer, free_port, require
from store_contract import StoreContract, StoreKit
from timekeeping import wait_until

from fastapi_once import once
from fastapi_once.backends import BackendError, LeaseLostError, WaitTimeoutError, backend_from_url
from fastapi_once.backends._store import Lease, Reset, StoreUnavailableError

redis_asyncio = require("redis.asyncio")
from fastapi_once.backends import RedisBackend  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """redis.asyncio is asyncio-only."""
    return "asyncio"


class TestRedisStore(StoreContract):
    @pytest.fixture
    async def kit(self, redis_server: RedisServer) -> AsyncIterator[StoreKit]:
        namespace = "t" + secrets.token_hex(6)
        async with StoreKit.closing(
            lambda: RedisBackend(redis_server.url, namespace=namespace)
        ) as kit:
            yield kit


@pytest.fixture
def namespace() -> str:
    return "t" + secrets.token_hex(6)


@pytest.fixture
def name() -> str:
    return f"tests.redis.job@{secrets.token_hex(4)}"


@pytest.fixture
async def side(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain client, to look at the keys behind the backend's back."""
    client = redis_asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def private_side(private_redis: RedisServer) -> AsyncIterator[Any]:
    """A plain client of the test's own server."""
    client = redis_asyncio.Redis.from_url(private_redis.url, decode_responses=True)
    yield client
    await client.aclose()


async def clients(side: Any) -> int:
    """How many clients the server has, not counting ``side``."""
    return len(await side.client_list()) - 1


def digest() -> str:
    return secrets.token_hex(20)  # what a shared key digest looks like


async def nothing() -> None:
    pass


async def test_forty_keys_in_flight_hold_at_most_max_connections(
    private_redis: RedisServer, private_side: Any
) -> None:
    """One process leading 40 keys at once, with a follower of each in another backend (another
    process's view) of the same loop: the server sees at most max_connections (10) clients per
    backend, during the work and after it."""
    # Leases renewed every 0.5 s: the renewals use the connections while they are counted, and a
    # loaded machine does not delay one past its lease.
    leader = RedisBackend(private_redis.url, lease=1.5)
    follower = RedisBackend(private_redis.url, lease=1.5)
    keys = [digest() for _ in range(40)]
    started, release = anyio.Event(), anyio.Event()
    got: list[str] = []

    async def work() -> str:
        started.set()
        await release.wait()
        return "v"

    async def call(backend: RedisBackend, key: str) -> None:
        got.append(await backend.run_keyed("tests.redis.forty", key, work, ttl=60))

    seen: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(call, leader, key)
            await started.wait()
            await anyio.sleep(0.3)  # every key led; now a follower of each claims and waits
            for key in keys:
                tg.start_soon(call, follower, key)
            for _ in range(4):  # renewals every 0.5 s meanwhile
                await anyio.sleep(0.3)
                seen.append(await clients(private_side))
            release.set()
        seen.append(await clients(private_side))
        assert got == ["v"] * 80
        assert leader.max_connections == 10
    finally:
        await leader.aclose()
        await follower.aclose()
    assert max(seen) <= 2 * 10, seen

    async def all_closed() -> bool:  # the server notices closed sockets on its next turn
        return await clients(private_side) == 0

    await wait_until(all_closed)


async def test_a_small_pool_serves_many_keys_through_its_connections(
    private_redis: RedisServer, private_side: Any
) -> None:
    """max_connections=3: 40 keys led at once share three connections (the listener's and two)."""
    # A lease long enough that 40 leaders renewing through two connections keep theirs on a
    # loaded machine.
    backend = RedisBackend(private_redis.url, lease=5.0, max_connections=3)
    started, release = anyio.Event(), anyio.Event()

    async def work() -> str:
        started.set()
        await release.wait()
        return "v"

    seen: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(functools.partial(backend.run_keyed, ttl=60), "small", digest(), work)
            await started.wait()
            for _ in range(4):
                await anyio.sleep(0.2)
                seen.append(await clients(private_side))
            release.set()
        seen.append(await clients(private_side))
    finally:
        await backend.aclose()
    assert max(seen) <= 3, seen


async def test_a_stalled_server_ends_every_call_within_wait_timeout(
    private_redis: RedisServer, private_side: Any
) -> None:
    """CLIENT PAUSE: the server keeps its connections and answers nothing. A follower already
    waiting on a leader, a new unkeyed call and a keyed call (which falls back under "local")
    all end within wait_timeout (+ 1 s)."""
    wait_timeout = 1.0
    backend = RedisBackend(private_redis.url, lease=0.6, wait_timeout=wait_timeout)
    other = RedisBackend(private_redis.url, lease=0.6, wait_timeout=wait_timeout)
    started = anyio.Event()
    name = "tests.redis.stalled"

    async def lead() -> str:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError

    async def fresh() -> str:
        return "fresh"

    calls: dict[str, Callable[[], Any]] = {
        "follower": lambda: backend.run_once(name, lead),
        "unkeyed": lambda: backend.run_once(name + ".new", fresh),
        "keyed": lambda: backend.share(name, digest(), fresh, ttl=60, on_error="local"),
    }
    took: dict[str, float] = {}
    outcome: dict[str, Any] = {}
    follower_ended = anyio.Event()

    async def leading() -> None:
        with pytest.raises(LeaseLostError):  # its lease ends in the pause
            await other.run_once(name, lead)

    async def timed(what: str) -> None:
        begun = anyio.current_time()
        try:
            outcome[what] = await calls[what]()
        except (WaitTimeoutError, BackendError) as exc:
            outcome[what] = type(exc)
        took[what] = anyio.current_time() - begun
        if what == "follower":
            follower_ended.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(leading)
            await started.wait()
            tg.start_soon(timed, "follower")
            await anyio.sleep(0.3)  # the follower waits on the leader's lease
            await private_side.execute_command("CLIENT", "PAUSE", "5000", "ALL")
            with anyio.fail_after(wait_timeout + 1.5):  # a guard: the bound is checked below
                async with anyio.create_task_group() as both:
                    both.start_soon(timed, "unkeyed")
                    both.start_soon(timed, "keyed")
                await follower_ended.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await backend.aclose()
            await other.aclose()
    assert issubclass(outcome["unkeyed"], BackendError), outcome
    assert outcome["keyed"] == "fresh", outcome
    assert issubclass(outcome["follower"], (WaitTimeoutError, BackendError)), outcome
    assert all(t <= wait_timeout + 1 for t in took.values()), took


@pytest.mark.parametrize("db", ["abc", "0x", "1a"])
def test_a_url_whose_database_part_is_not_a_number_is_refused_naming_it(db: str) -> None:
    """redis-py would silently use database 0; the constructor and backend_from_url refuse the
    URL, naming the database part and never the password."""
    url = f"redis://:hunter2secret@127.0.0.1:6379/{db}"
    for build in (RedisBackend, backend_from_url):
        with pytest.raises(ValueError, match=db) as info:
            build(url)
        assert "hunter2secret" not in str(info.value)
    assert (
        RedisBackend("redis://127.0.0.1:6379/3").describe().endswith("/3, namespace=fastapi_once)")
    )


def test_options_are_checked() -> None:
    """A bad option is a ValueError naming it."""
    with pytest.raises(ValueError, match="lease=0"):
        RedisBackend(lease=0)
    with pytest.raises(ValueError, match="namespace"):
        RedisBackend(namespace="")
    with pytest.raises(ValueError, match="without braces"):
        RedisBackend(namespace="app:{x}")
    for bad in (1, 0, True, 2.5, "10"):
        with pytest.raises(ValueError, match="max_connections"):
            RedisBackend(max_connections=bad)  # type: ignore[arg-type]


def test_poll_interval_is_no_longer_used_and_says_so() -> None:
    """Followers are woken by PUBLISH: poll_interval= warns, naming recheck_interval=."""
    with pytest.warns(DeprecationWarning, match="recheck_interval"):
        RedisBackend(poll_interval=0.025)


async def test_an_unreachable_redis_raises_backend_error_without_the_password(name: str) -> None:
    """Unreachable at the first contact (an unkeyed once raises): the URL's password is masked
    in the error; the driver's exception is the cause."""
    backend = RedisBackend(f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", lease=0.5)
    with anyio.fail_after(10), pytest.raises(BackendError) as info:
        await backend.run_once(name, nothing)
    assert "hunter2secret" not in str(info.value)
    assert "redis://:***@127.0.0.1" in str(info.value)
    assert info.value.__cause__ is not None
    await backend.aclose()


async def test_a_wrong_password_is_an_error_not_an_outage_to_fall_back_from(
    redis_server: RedisServer, name: str
) -> None:
    """Refused credentials are a misconfiguration: BackendError (naming no password) even under
    on_backend_error="local", which falls back only when Redis cannot be reached."""
    url = redis_server.url.replace(redis_server.password, "wrong-secret-pw")
    backend = RedisBackend(url, lease=0.5)
    try:
        with anyio.fail_after(10), pytest.raises(BackendError) as info:
            await backend.share(name, digest(), nothing, ttl=60, on_error="local")
    finally:
        await backend.aclose()
    assert not isinstance(info.value, StoreUnavailableError)
    assert "wrong-secret-pw" not in str(info.value)
    assert redis_server.password not in str(info.value)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_redis_backend_refuses_trio_clearly(redis_server: RedisServer, name: str) -> None:
    """redis.asyncio needs asyncio: on trio the error says so and points to FileLockBackend."""
    backend = RedisBackend(redis_server.url)
    with pytest.raises(RuntimeError, match="asyncio only"):
        await backend.run_once(name, nothing)


async def test_names_with_braces_and_percent_signs_never_share_keys(
    redis_server: RedisServer, side: Any, namespace: str
) -> None:
    """Braces are percent-encoded in the hash tag: each name has its own keys, one slot."""
    backend = RedisBackend(redis_server.url, namespace=namespace)
    names = ["a}:{b", "a%7D:%7Bb", "{a}", "%7Ba%7D"]
    try:
        for i, name in enumerate(names):

            async def work(i: int = i) -> int:
                return i

            assert await backend.run_once(name, work) == i
    finally:
        await backend.aclose()
    values = sorted(await side.keys(f"{namespace}:*:v"))
    assert len(values) == 4
    for key in values:
        tag = key[key.index("{") + 1 : key.index("}")]
        assert key == f"{namespace}:k:{{{tag}}}:v"


async def test_an_unkeyed_value_recorded_by_0_2_is_served_until_it_is_reset(
    redis_server: RedisServer, side: Any, namespace: str, name: str
) -> None:
    """0.2 kept an unkeyed once's value as its JSON alone under <namespace>:{<name>}:done: after
    the upgrade it is served (a migration does not run again), and a reset clears it."""
    await side.set(f"{namespace}:{{{name}}}:done", '{"migrated": 3}')
    backend = RedisBackend(redis_server.url, namespace=namespace)
    runs: list[int] = []

    async def migrate() -> dict[str, int]:
        runs.append(1)
        return {"migrated": 4}

    try:
        assert await backend.run_once(name, migrate) == {"migrated": 3}
        assert runs == []
        await backend.reset(name)
        assert await side.exists(f"{namespace}:{{{name}}}:done") == 0
        assert await backend.run_once(name, migrate) == {"migrated": 4}
        assert runs == [1]
    finally:
        await backend.aclose()


async def test_a_fence_exceeds_the_record_counter_and_never_falls_below_the_server_clock(
    redis_server: RedisServer, side: Any, namespace: str
) -> None:
    """A lease's fence is the record's counter plus one, floored at the server's clock in
    microseconds; the counter lives 60 s past the lease."""
    backend = RedisBackend(redis_server.url, namespace=namespace)
    counter = f"{namespace}:k:{{n:-}}:fence"
    try:
        first = await backend.claim("n", "-", lease=1, refresh=None, holder="test")
        now, micros = await side.time()
        assert isinstance(first, Lease)
        assert first.fence is not None
        assert (now - 60) * 10**6 < first.fence <= now * 10**6 + micros
        await backend.abandon(first, cooldown=None)
        await side.set(counter, str(5 * 10**15))  # ahead of the clock (a clock set back)
        second = await backend.claim("n", "-", lease=1, refresh=None, holder="test")
        assert isinstance(second, Lease)
        assert second.fence == 5 * 10**15 + 1
        assert await side.get(counter) == str(5 * 10**15 + 1)
        assert 60_000 < await side.pttl(counter) <= 61_000
        await backend.abandon(second, cooldown=None)
    finally:
        await backend.aclose()


async def test_aclose_stops_the_listener_and_a_later_call_starts_it_again(
    redis_server: RedisServer, namespace: str, name: str
) -> None:
    """One listener task per loop: aclose ends it, the next call starts it again, and values
    are served throughout."""
    backend = RedisBackend(redis_server.url, namespace=namespace)

    async def echo(url: str) -> str:
        return url

    stuff = once(echo, key=lambda url: url, ttl=60, across=backend)
    loop = asyncio.get_running_loop()
    assert await stuff("/a") == "/a"
    assert loop in backend._listeners
    await backend.aclose()
    assert loop not in backend._listeners
    assert await stuff("/b") == "/b"
    assert loop in backend._listeners
    await backend.aclose()


async def test_a_message_on_the_reset_channel_that_is_not_a_reset_is_ignored(
    redis_server: RedisServer, side: Any, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone else's message on <namespace>:k:resets is logged and skipped; the listener goes
    on, so a real reset afterwards is still heard."""
    backend = RedisBackend(redis_server.url, namespace=namespace)
    heard: list[Reset] = []
    backend.bind(heard.append)
    try:
        await backend.claim("n", "-", lease=1, refresh=None, holder="test")  # starts listening
        await side.publish(f"{namespace}:k:resets", "not json")
        await side.publish(f"{namespace}:k:resets", '{"name": "x"}')
        await wait_until(lambda: caplog.text.count("not one of ours") == 2)
        await backend.clear("n", None, origin="elsewhere")
        await wait_until(lambda: heard == [Reset("n", None, "elsewhere")])
    finally:
        await backend.aclose()


def test_a_percent_encoded_password_is_masked_as_written_and_decoded() -> None:
    """The one scrubber masks the password in both spellings."""
    from fastapi_once.backends._base import Scrubber

    scrub = Scrubber("redis://:p%40ss%3Aword@cache:6379/0")
    assert scrub.shown == "redis://:***@cache:6379/0"
    assert scrub("AuthenticationError: p@ss:word refused") == "AuthenticationError: *** refused"
    assert "p%40ss" not in scrub("bad url redis://:p%40ss%3Aword@cache")
    assert "p%40ss" not in RedisBackend("redis://:p%40ss%3Aword@cache:6379/0").describe()
