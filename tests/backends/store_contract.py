"""The contract every LeaseStore passes, written once (see fastapi_once/backends/_store.py).

Plug a store in by subclassing :class:`StoreContract` in a test module and giving it a ``kit``
fixture that yields a :class:`StoreKit`::

    class TestRedisStore(StoreContract):
        @pytest.fixture
        async def kit(self, redis_server) -> AsyncIterator[StoreKit]:
            async with StoreKit.closing(lambda: RedisBackend(redis_server.url)) as kit:
                yield kit

Each ``kit.make()`` is one more process's view of one shared store (the same server and
namespace), fresh for the test. Times are short real seconds (instant under trio's MockClock).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from fastapi_once.backends._store import (
    UNKEYED,
    Cooling,
    Held,
    Lease,
    LeaseStore,
    Reset,
    Served,
)

LEASE = 0.6  # seconds a lease lives in these tests
SLACK = 0.4  # past a deadline, how long before the store must have acted on it
HOLDER = "pid 1 on test"


class StoreKit:
    """Makes views of one shared store, and closes them at the end.

    Args:
        make: builds a new view (a store object) of the test's shared store.
        leases_expire: whether a lease not renewed ends after its seconds (False: it ends only
            when its holder frees it or dies, as a ``flock`` does).
        fenced: whether leases carry fencing tokens.
    """

    def __init__(
        self, make: Callable[[], LeaseStore], *, leases_expire: bool = True, fenced: bool = True
    ) -> None:
        self._make = make
        self.leases_expire = leases_expire
        self.fenced = fenced
        self.made: list[LeaseStore] = []

    def make(self) -> LeaseStore:
        """A new view of the shared store: another process."""
        store = self._make()
        self.made.append(store)
        return store

    @classmethod
    @contextlib.asynccontextmanager
    async def closing(
        cls, make: Callable[[], LeaseStore], **options: bool
    ) -> AsyncIterator[StoreKit]:
        """A kit whose stores are closed when the block ends."""
        kit = cls(make, **options)
        try:
            yield kit
        finally:
            for store in kit.made:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await store.aclose()


_prefixes = itertools.count()


def _key() -> str:
    """What a shared key digest looks like: 40 hex digits. Keys made one after the other differ
    in their first two digits: the file store's keys that share those share one lock file (as
    documented), so random keys would collide there now and then."""
    return f"{next(_prefixes) % 256:02x}{secrets.token_hex(19)}"


async def _claim(
    store: LeaseStore,
    name: str,
    key: str = UNKEYED,
    *,
    lease: float = LEASE,
    refresh: float | None = None,
) -> Served | Cooling | Lease | Held:
    return await store.claim(name, key, lease=lease, refresh=refresh, holder=HOLDER)


async def _lead(store: LeaseStore, name: str, key: str = UNKEYED, **options: float) -> Lease:
    claim = await _claim(store, name, key, **options)
    assert isinstance(claim, Lease), claim
    return claim


async def _lead_once_past(
    store: LeaseStore, name: str, key: str = UNKEYED, *, after: float, **options: float
) -> Lease:
    """The lease of a claim once ``after`` seconds (a deadline of the store's) have passed.

    Claims from then on until one leads: the one started SLACK past the deadline must lead,
    as a single claim after ``after + SLACK`` would; the earlier ones find the record as it
    was (served, cooling or held), which leaves it as it is, and save waiting out the slack.
    """
    deadline = anyio.current_time() + after + SLACK
    await anyio.sleep(after)
    while True:
        last = anyio.current_time() >= deadline
        claim = await _claim(store, name, key, **options)
        if isinstance(claim, Lease):
            return claim
        assert not last, claim
        await anyio.sleep(0.02)


@pytest.mark.anyio
class StoreContract:
    """The behaviour every store shares; a subclass supplies the ``kit`` fixture."""

    @pytest.fixture
    def name(self) -> str:
        return f"tests.contract.{secrets.token_hex(4)}"

    async def test_the_first_claim_leads_and_another_finds_the_lease_held_naming_the_holder(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        lease = await _lead(a, name)
        assert (lease.name, lease.key) == (name, UNKEYED)
        assert await _claim(b, name) == Held(HOLDER)
        assert await _claim(a, name) == Held(HOLDER)  # the same process claims again: held too
        await a.abandon(lease, cooldown=None)

    async def test_a_completed_value_is_served_to_every_process(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        lease = await _lead(a, name)
        assert await a.complete(lease, '{"v": 1}', ttl=None)
        assert await _claim(b, name) == Served('{"v": 1}')
        assert await _claim(a, name) == Served('{"v": 1}')

    async def test_a_value_expires_after_its_ttl_and_the_next_claim_leads(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        assert await a.complete(await _lead(a, name), "1", ttl=0.3)
        assert await _claim(b, name) == Served("1")
        await b.abandon(await _lead_once_past(b, name, after=0.3), cooldown=None)

    async def test_a_failure_with_a_cooldown_is_cooling_until_it_ends(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        await a.abandon(await _lead(a, name), cooldown=0.5)
        cooling = await _claim(b, name)
        assert isinstance(cooling, Cooling)
        assert 0 < cooling.seconds_left <= 0.5
        await b.abandon(await _lead_once_past(b, name, after=0.5), cooldown=None)

    async def test_a_failure_without_a_cooldown_lets_the_next_claim_lead_at_once(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        await a.abandon(await _lead(a, name), cooldown=None)
        await b.abandon(await _lead(b, name), cooldown=None)

    async def test_a_value_due_for_refresh_is_led_by_one_and_served_to_the_others(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        key = _key()
        assert await a.complete(await _lead(a, name, key), "old", ttl=30)
        assert await _claim(b, name, key, refresh=0.3) == Served("old")  # fresh yet
        refresher = await _lead_once_past(b, name, key, after=0.3, refresh=0.3)
        assert await _claim(a, name, key, refresh=0.3) == Served("old")
        assert await b.complete(refresher, "new", ttl=30)
        assert await _claim(a, name, key, refresh=0.3) == Served("new")

    async def test_a_failed_refresh_keeps_the_value_served_while_it_cools_down(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        key = _key()
        assert await a.complete(await _lead(a, name, key), "old", ttl=30)
        await a.abandon(await _lead_once_past(a, name, key, after=0.2, refresh=0.2), cooldown=30)
        assert await _claim(b, name, key, refresh=0.2) == Served("old")

    async def test_a_lease_not_renewed_ends_and_its_late_complete_records_nothing(
        self, kit: StoreKit, name: str
    ) -> None:
        if not kit.leases_expire:
            pytest.skip("this store's leases end with their holder only")
        a, b = kit.make(), kit.make()
        first = await _lead(a, name, lease=0.3)
        second = await _lead_once_past(b, name, after=0.3)
        assert not await a.renew(first, seconds=LEASE)
        assert not await a.complete(first, '"late"', ttl=None)
        assert await _claim(a, name) == Held(HOLDER)  # nothing recorded; the second leads
        if kit.fenced:
            assert first.fence is not None
            assert second.fence is not None
            assert second.fence > first.fence
        await b.abandon(second, cooldown=None)

    async def test_a_renewed_lease_outlives_its_first_seconds(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        lease = await _lead(a, name, lease=0.4)
        for _ in range(4):
            await anyio.sleep(0.2)
            assert await a.renew(lease, seconds=0.4)
        assert isinstance(await _claim(b, name), Held)
        assert await a.complete(lease, "1", ttl=None)

    async def test_every_lease_of_a_record_has_a_larger_fencing_token_than_the_last(
        self, kit: StoreKit, name: str
    ) -> None:
        if not kit.fenced:
            pytest.skip("this store has no fencing tokens")
        a, b = kit.make(), kit.make()
        fences = []
        for store in (a, b, a):
            lease = await _lead(store, name)
            fences.append(lease.fence)
            assert await store.complete(lease, "1", ttl=None)
            await store.clear(name, UNKEYED, origin="test")
        assert all(isinstance(f, int) for f in fences)
        assert fences == sorted(fences)
        assert len(set(fences)) == 3

    async def test_keys_are_independent_records(self, kit: StoreKit, name: str) -> None:
        a, b = kit.make(), kit.make()
        one, two = _key(), _key()
        lease = await _lead(a, name, one)
        other = await _lead(b, name, two)
        assert await b.complete(other, "2", ttl=30)
        assert await _claim(a, name, two) == Served("2")
        assert await _claim(b, name, one) == Held(HOLDER)
        await a.abandon(lease, cooldown=None)

    async def test_a_reset_of_one_key_clears_its_value_and_cooldown_only(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        one, two, three = _key(), _key(), _key()
        assert await a.complete(await _lead(a, name, one), "1", ttl=30)
        assert await a.complete(await _lead(a, name, two), "2", ttl=30)
        await a.abandon(await _lead(a, name, three), cooldown=30)
        await b.clear(name, one, origin="test")
        await b.clear(name, three, origin="test")
        await a.abandon(await _lead(a, name, one), cooldown=None)
        await a.abandon(await _lead(a, name, three), cooldown=None)
        assert await _claim(a, name, two) == Served("2")

    async def test_a_reset_of_every_key_clears_the_name_and_no_other(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        keys = [_key() for _ in range(3)]
        for key in keys:
            assert await a.complete(await _lead(a, name, key), "v", ttl=30)
        assert await a.complete(await _lead(a, name + "x", keys[0]), "other", ttl=30)
        await b.clear(name, None, origin="test")
        for key in keys:
            await a.abandon(await _lead(a, name, key), cooldown=None)
        assert await _claim(a, name + "x", keys[0]) == Served("other")

    async def test_a_reset_leaves_a_held_lease_held(self, kit: StoreKit, name: str) -> None:
        a, b = kit.make(), kit.make()
        lease = await _lead(a, name)
        await b.clear(name, UNKEYED, origin="test")
        assert isinstance(await _claim(b, name), Held)
        assert await a.complete(lease, "1", ttl=None)

    async def test_a_reset_is_heard_by_every_listening_process_with_its_origin(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b, cli = kit.make(), kit.make(), kit.make()
        heard_a: list[Reset] = []
        heard_b: list[Reset] = []
        a.bind(heard_a.append)
        b.bind(heard_b.append)
        key = _key()
        assert await a.complete(await _lead(a, name, key), "1", ttl=30)
        assert await _claim(b, name, key) == Served("1")  # b listens from its first claim
        await cli.clear(name, key, origin="cli")
        await cli.clear(name, None, origin="cli")
        expected = [Reset(name, key, "cli"), Reset(name, None, "cli")]
        for _ in range(round((1 + SLACK) / 0.01)):  # every process hears it within 1 s
            if heard_a == expected and heard_b == expected:
                break
            await anyio.sleep(0.01)
        assert heard_a == expected
        assert heard_b == expected

    async def test_a_watch_returns_when_the_leader_completes_abandons_or_the_record_is_reset(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        key = _key()
        for end in ("complete", "abandon", "reset"):
            lease = await _lead(a, name, key)
            async with b.watch(name, key) as watch:
                assert isinstance(await _claim(b, name, key), Held)

                async def end_it(lease: Lease = lease, end: str = end) -> None:
                    await anyio.sleep(0.1)
                    if end == "complete":
                        assert await a.complete(lease, "1", ttl=30)
                    elif end == "abandon":
                        await a.abandon(lease, cooldown=None)
                    else:
                        await a.clear(name, key, origin="test")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(end_it)
                    with anyio.fail_after(5):  # far below the watch's own timeout
                        await watch.changed(timeout=60)
            if end == "reset":
                await a.abandon(lease, cooldown=None)
            await a.clear(name, key, origin="test")

    async def test_a_change_between_the_claim_and_the_wait_is_not_lost(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        lease = await _lead(a, name)
        async with b.watch(name, UNKEYED) as watch:
            assert isinstance(await _claim(b, name), Held)
            assert await a.complete(lease, "1", ttl=None)
            await anyio.sleep(0.2)
            with anyio.fail_after(5):
                await watch.changed(timeout=60)
        assert await _claim(b, name) == Served("1")

    async def test_a_watch_without_a_change_returns_after_its_timeout(
        self, kit: StoreKit, name: str
    ) -> None:
        a, b = kit.make(), kit.make()
        lease = await _lead(a, name)
        async with b.watch(name, UNKEYED) as watch:
            with anyio.fail_after(5):
                await watch.changed(timeout=0.2)
        await a.abandon(lease, cooldown=None)

    async def test_a_closed_store_opens_again_on_its_next_use(
        self, kit: StoreKit, name: str
    ) -> None:
        a = kit.make()
        await a.complete(await _lead(a, name), "1", ttl=None)
        await a.aclose()
        assert await _claim(a, name) == Served("1")
        await a.aclose()
