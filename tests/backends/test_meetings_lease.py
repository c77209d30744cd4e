"""Where the cross-process features meet: listener cancellations; on_backend_error= with ttl,
refresh, cooldown, reset and key None on the lease algorithm."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import anyio
import pytest
from memory_store import MemoryServer, MemoryStore
from test_listener_shutdown import ENDS_WITHIN, run_in_a_thread

from fastapi_once import once
from fastapi_once.backends._wakeups import Listeners, Wakeups


def test_a_native_cancellation_in_a_running_loop_that_the_driver_loses_still_ends_it() -> None:
    """Cancelled natively while the loop runs (as code that cancels every task does), the
    listener loses the cancellation once and goes on: it still ends, without stop()."""
    from test_listener_shutdown import swallowing_once

    async def listen(wakeups: Wakeups) -> None:
        wakeups.listening.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        listeners = Listeners(swallowing_once(listen))
        wakeups = listeners.start()
        await wakeups.listening.wait()
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "fastapi_once listener"]
        task.cancel()
        await asyncio.wait_for(asyncio.wait([task]), ENDS_WITHIN)
        assert task.cancelled()

    if not hasattr(asyncio.Task, "cancelling"):  # Python 3.10 counts no cancellations
        pytest.skip("Task.cancelling() is Python 3.11+")
    run_in_a_thread(main)


@pytest.fixture
def name() -> str:
    return f"tests.meetings.lease.{secrets.token_hex(4)}"


@pytest.mark.anyio
async def test_under_local_a_value_past_its_ttl_is_made_here_while_the_store_is_down(
    name: str,
) -> None:
    """A keyed value whose ttl ran out (no stale_if_error=: nothing kept to serve) is made again
    in this process while the store is down, as a key never seen is."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        return f"{url} #{len(runs)}"

    stuff = once(get_stuff, key=lambda url: url, ttl=0.2, across=MemoryStore(server), name=name)
    assert await stuff("a") == "a #1"
    server.down = True
    await anyio.sleep(0.3)  # past the ttl
    assert await stuff("a") == "a #2"


@pytest.mark.anyio
async def test_under_local_a_due_refresh_while_the_store_is_down_keeps_serving(
    name: str,
) -> None:
    """refresh= with the store down: the value being refreshed is served meanwhile."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        return f"{url} #{len(runs)}"

    stuff = once(
        get_stuff, key=lambda url: url, ttl=5, refresh=0.1, across=MemoryStore(server), name=name
    )
    assert await stuff("a") == "a #1"
    server.down = True
    await anyio.sleep(0.2)  # the refresh is due
    assert await stuff("a") == "a #1"


@pytest.mark.anyio
async def test_under_local_a_reset_while_the_store_is_down_forgets_here_and_says_so(
    name: str,
) -> None:
    """reset() with the store down: this process forgets the value (the next call makes it
    here), and the reset raises BackendError, since other processes were not told."""
    from fastapi_once.backends import BackendError

    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        return f"{url} #{len(runs)}"

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=MemoryStore(server), name=name)
    assert await stuff("a") == "a #1"
    server.down = True
    with pytest.raises(BackendError):
        await stuff.reset("a")
    assert await stuff("a") == "a #2"


@pytest.mark.anyio
async def test_under_local_a_failure_made_here_cools_down_here_and_the_store_is_used_after(
    name: str,
) -> None:
    """cooldown= with the store down: a failed local run cools the key down in this process;
    after the cooldown, with the store back, the value is made and recorded fleet-wide."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        if server.down:
            raise ConnectionError("upstream down too")
        return f"{url} #{len(runs)}"

    stuff = once(
        get_stuff,
        key=lambda url: url,
        ttl=60,
        cooldown=0.2,
        across=MemoryStore(server),
        name=name,
    )
    server.down = True
    with pytest.raises(ConnectionError):
        await stuff("a")
    with pytest.raises(ConnectionError):
        await stuff("a")  # cooling down: no second run
    assert runs == ["a"]
    server.down = False
    await anyio.sleep(0.3)
    assert await stuff("a") == "a #2"
    assert any(rec.value for (n, _), rec in server.records.items() if n == name)


@pytest.mark.anyio
async def test_a_key_function_returning_none_is_shared_through_the_store(name: str) -> None:
    """key=None is a key like any other: recorded once, served to another process."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        return "one"

    first = once(get_stuff, key=lambda url: None, ttl=60, across=MemoryStore(server), name=name)

    async def get_stuff_elsewhere(url: str) -> str:
        runs.append("elsewhere")
        return "other"

    other = once(
        get_stuff_elsewhere, key=lambda url: None, ttl=60, across=MemoryStore(server), name=name
    )
    assert await first("a") == "one"
    assert await other("b") == "one"
    assert runs == ["a"]


@pytest.mark.anyio
async def test_under_local_a_leader_whose_store_goes_away_for_a_whole_lease_serves_its_value(
    name: str,
) -> None:
    """The store goes away while the leader works, for longer than a lease: under "local" the
    work goes on (this process would make the value anyway) and its value is served,
    unrecorded, rather than cancelled with LeaseLostError."""
    server = MemoryServer()
    runs: list[str] = []

    async def get_stuff(url: str) -> str:
        runs.append(url)
        server.down = True  # the store goes away while the leader works
        await anyio.sleep(0.6)  # four leases
        return f"{url} #{len(runs)}"

    stuff = once(
        get_stuff, key=lambda url: url, ttl=60, across=MemoryStore(server, lease=0.15), name=name
    )
    assert await stuff("a") == "a #1"
    assert runs == ["a"]


@pytest.mark.anyio
async def test_under_raise_a_leader_whose_store_goes_away_for_a_whole_lease_stops(
    name: str,
) -> None:
    """The same outage under "raise" (a migration): the work is cancelled, LeaseLostError."""
    from fastapi_once.backends import LeaseLostError

    server = MemoryServer()

    async def migrate() -> str:
        server.down = True
        await anyio.sleep(0.6)
        return "done"

    migration = once(
        migrate, across=MemoryStore(server, lease=0.15), name=name, on_backend_error="raise"
    )
    with pytest.raises(LeaseLostError):
        await migration()


@pytest.mark.anyio
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
async def test_a_file_store_whose_directory_cannot_be_used_raises_backend_error(
    name: str, tmp_path: Path, keyed: bool
) -> None:
    """The directory's path goes through a regular file (likewise a read-only or full disk):
    BackendError naming the store, from the OSError, not a bare NotADirectoryError."""
    from fastapi_once.backends import BackendError, FileLockBackend

    blocker = tmp_path / "a-file"
    blocker.write_text("")

    async def get_stuff(url: str) -> str:
        return url

    async def get_setup() -> str:
        return "setup"

    across = FileLockBackend(str(blocker / "locks"))
    expected = r"FileLockBackend\(.*\): the directory cannot be used \(Not a directory\)"

    async def call() -> str:
        if keyed:
            return await once(get_stuff, key=lambda url: url, ttl=60, across=across, name=name)("a")
        return await once(get_setup, across=across, name=name)()

    with pytest.raises(BackendError, match=expected) as caught:
        await call()
    assert isinstance(caught.value.__cause__, NotADirectoryError)
