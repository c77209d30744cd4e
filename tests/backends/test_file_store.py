"""The file backend passes the store contract (two backends in one process stand for two
processes: each claim opens its own file, and flock locks belong to open files)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from store_contract import StoreContract, StoreKit
from timekeeping import wait_until

from fastapi_once import once
from fastapi_once.backends import BackendError, FileLockBackend
from fastapi_once.backends._store import UNKEYED, Claim, Lease, Reset, Served

LISTENER = "fastapi_once resets listener"  # the name of a loop's listener task


def open_files(directory: Path) -> list[str]:
    """The lock and marker files under ``directory`` that this process holds open."""
    files = {}
    for path in [*directory.rglob("*.lock"), *directory.rglob("*.json")]:
        st = path.stat()
        files[st.st_dev, st.st_ino] = path.name
    held = []
    for fd in os.listdir("/dev/fd"):
        with contextlib.suppress(OSError):  # the descriptor of the listing itself, closed
            st = os.fstat(int(fd))
            held += [files[st.st_dev, st.st_ino]] if (st.st_dev, st.st_ino) in files else []
    return sorted(held)


def listeners() -> set[int]:
    """The running loop's listener tasks of resets (asyncio tasks or trio system tasks)."""
    return {task.id for task in anyio.get_running_tasks() if task.name == LISTENER}


@pytest.fixture(autouse=True)
def no_file_is_left_open(tmp_path: Path) -> Iterator[None]:
    """Every lease and watch of a test is ended: it leaves no lock or marker file open."""
    yield
    assert open_files(tmp_path) == []


class TestFileStore(StoreContract):
    @pytest.fixture
    async def kit(self, tmp_path: Path) -> AsyncIterator[StoreKit]:
        directory = tmp_path / "locks"
        async with StoreKit.closing(
            lambda: FileLockBackend(directory), leases_expire=False, fenced=False
        ) as kit:
            yield kit


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_loop_that_ends_without_aclose_ends_its_listener(tmp_path: Path, loop: str) -> None:
    """A keyed once used in a loop run in a thread, never closed: the loop (and its listener of
    resets) ends, again and again."""
    backend = FileLockBackend(tmp_path / "locks")

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=backend, name=f"t.end.{loop}")

    async def use() -> None:
        assert await stuff("a") == "a"
        await stuff.reset("a")  # the listener is reading the log now and then

    for _ in range(5):
        thread = threading.Thread(target=anyio.run, args=(use,), kwargs={"backend": loop})
        thread.start()
        thread.join(timeout=20)  # a hang guard
        assert not thread.is_alive()


@pytest.mark.anyio
async def test_a_line_in_the_resets_log_that_is_not_a_reset_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines the store did not write are logged and skipped; the listener goes on, so a real
    reset afterwards is still heard."""
    backend = FileLockBackend(tmp_path / "locks")
    heard: list[Reset] = []
    backend.bind(heard.append)
    try:
        lease = await backend.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
        assert isinstance(lease, Lease)  # the claim started the listener
        await backend.abandon(lease, cooldown=None)
        strangers = 'not json\n{"name": "n", "key": 0, "origin": "o"}\n'
        (tmp_path / "locks" / "resets.log").write_text(strangers)
        await wait_until(lambda: caplog.text.count("not one of ours") == 2)
        await backend.clear("n", None, origin="elsewhere")
        await wait_until(lambda: heard == [Reset("n", None, "elsewhere")])
    finally:
        await backend.aclose()


@pytest.mark.anyio
async def test_every_64th_marker_written_deletes_the_markers_that_expired(tmp_path: Path) -> None:
    """A keyed once's markers do not pile up: every 64th marker a backend writes deletes those
    of the once's keys whose value expired and whose cooldown ended; live ones stay."""
    backend = FileLockBackend(tmp_path / "locks")
    keys = [f"{i:02x}" + "0" * 38 for i in range(64)]

    async def lead(key: str) -> Lease:
        lease = await backend.claim("n", key, lease=1, refresh=None, holder="test")
        assert isinstance(lease, Lease)
        return lease

    try:
        assert await backend.complete(await lead(keys[0]), "kept", ttl=60)
        for key in keys[1:32]:
            assert await backend.complete(await lead(key), "1", ttl=0.05)
        for key in keys[32:63]:
            await backend.abandon(await lead(key), cooldown=0.05)
        assert len(list((tmp_path / "locks").glob("*.json"))) == 63
        await anyio.to_thread.run_sync(time.sleep, 0.2)  # wall-clock time: markers hold it
        assert await backend.complete(await lead(keys[63]), "last", ttl=60)  # the 64th write
        assert len(list((tmp_path / "locks").glob("*.json"))) == 2
        assert await backend.claim("n", keys[0], lease=1, refresh=None, holder="t") == Served(
            "kept"
        )
    finally:
        await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("end", ["complete", "abandon"])
async def test_a_lease_ended_by_a_cancelled_caller_is_unlocked(tmp_path: Path, end: str) -> None:
    """complete() or abandon() called in a cancelled scope records nothing, yet lets go of the
    lock: the next claim leads, rather than finding the lease held until the process exits."""
    backend = FileLockBackend(tmp_path / "locks")
    lease = await backend.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
    assert isinstance(lease, Lease)
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            if end == "complete":
                await backend.complete(lease, "1", ttl=None)
            else:
                await backend.abandon(lease, cooldown=30)
        again = await backend.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
        assert isinstance(again, Lease)
        await backend.abandon(again, cooldown=None)
    finally:
        await backend.aclose()


@pytest.mark.anyio
async def test_a_claim_cancelled_while_its_thread_took_the_lock_lets_go_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller of a claim is cancelled while the claim's thread takes the lock: the claim
    raises the cancellation and unlocks, so the next claim leads rather than finding the lease
    held until the process exits."""
    backend = FileLockBackend(tmp_path / "locks")
    claim = backend._claim
    try:
        with anyio.CancelScope() as scope:

            def cancelled_meanwhile(*args: Any) -> Claim:
                taken = claim(*args)
                anyio.from_thread.run_sync(scope.cancel)
                return taken

            monkeypatch.setattr(backend, "_claim", cancelled_meanwhile)
            await backend.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
        assert scope.cancelled_caught
        monkeypatch.undo()
        again = await backend.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
        assert isinstance(again, Lease)
        await backend.abandon(again, cooldown=None)
    finally:
        await backend.aclose()


async def _lead(backend: FileLockBackend, key: str) -> Lease:
    lease = await backend.claim("n", key, lease=1, refresh=None, holder="test")
    assert isinstance(lease, Lease)
    return lease


async def _listening(backend: FileLockBackend, key: str) -> int:
    """Claim (and let go of) ``key``, which starts the loop's listener: its task's id."""
    before = listeners()
    await backend.abandon(await _lead(backend, key), cooldown=None)
    (listener,) = listeners() - before
    return listener


async def _a_new_claim_hears_the_next_reset(
    backend: FileLockBackend, other: FileLockBackend, heard: list[Reset]
) -> None:
    await backend.abandon(await _lead(backend, "cd" * 20), cooldown=None)
    await other.clear("n", None, origin="after")
    await wait_until(lambda: heard == [Reset("n", None, "after")])


@pytest.mark.anyio
async def test_a_claim_that_fails_reading_the_holder_closes_the_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that finds the lock held and then fails reading who holds it raises, and closes
    the lock file it opened (it stayed open until the process exited)."""
    backend, other = FileLockBackend(tmp_path / "locks"), FileLockBackend(tmp_path / "locks")
    lease = await _lead(backend, UNKEYED)

    def broken(fd: int, length: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(os, "pread", broken)
            with pytest.raises(BackendError, match="cannot be used"):
                await other.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
        assert len(open_files(tmp_path)) == 1  # the lease's own
        await backend.abandon(lease, cooldown=None)
    finally:
        await backend.aclose()
        await other.aclose()


@pytest.mark.anyio
async def test_a_failed_look_at_the_resets_log_is_a_backend_error_and_lets_go_of_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resets log's size, looked at when a loop's first claim starts its listener and when
    a watch begins, fails as the store's other reads do: a BackendError naming the store (not
    the bare OSError), and the lock the claim took is let go."""
    backend = FileLockBackend(tmp_path / "locks")
    real_stat = os.stat

    def broken(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == "resets.log":
            raise OSError(5, "Input/output error")
        return real_stat(path, *args, **kwargs)

    try:
        with monkeypatch.context() as patched:
            patched.setattr(os, "stat", broken)
            with pytest.raises(BackendError, match="cannot be used"):
                await backend.claim("n", UNKEYED, lease=1, refresh=None, holder="test")
            assert open_files(tmp_path) == []  # the lock taken, let go
            with pytest.raises(BackendError, match="cannot be used"):
                async with backend.watch("n", UNKEYED):
                    pass  # pragma: no cover - the watch does not begin
            assert open_files(tmp_path) == []
        await backend.abandon(await _lead(backend, UNKEYED), cooldown=None)  # the log is back
    finally:
        await backend.aclose()


@pytest.mark.anyio
async def test_a_listener_stopped_by_an_error_is_said_and_the_next_claim_listens_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error ends the loop's listener of resets with one ERROR (one record in
    all) naming its type (not its text); the loop's next claim starts a new listener, which
    hears later resets."""
    backend, other = FileLockBackend(tmp_path / "locks"), FileLockBackend(tmp_path / "locks")
    heard: list[Reset] = []
    backend.bind(heard.append)
    read = backend._read_resets

    def broken(offset: int) -> tuple[list[Reset], int]:
        monkeypatch.setattr(backend, "_read_resets", read)  # fails once
        raise RuntimeError("secret detail")

    monkeypatch.setattr(backend, "_read_resets", broken)
    try:
        with caplog.at_level(logging.ERROR):
            listener = await _listening(backend, "ab" * 20)
            await wait_until(lambda: listener not in listeners())  # it has ended
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "stopped listening" in record.getMessage()
        assert "RuntimeError" in record.getMessage()
        assert "secret detail" not in caplog.text
        await _a_new_claim_hears_the_next_reset(backend, other, heard)
    finally:
        await backend.aclose()
        await other.aclose()


@pytest.mark.anyio
async def test_an_os_error_of_the_resets_callback_is_said_not_taken_for_a_missing_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener passes over an OSError of reading the resets log (read again next time),
    but one raised by the callback it hands a reset to is a defect: one ERROR says it (one
    record in all)."""
    backend, other = FileLockBackend(tmp_path / "locks"), FileLockBackend(tmp_path / "locks")

    def broken(reset: Reset) -> None:
        raise OSError("secret detail")

    backend.bind(broken)
    try:
        with caplog.at_level(logging.ERROR):
            listener = await _listening(backend, "ab" * 20)
            await other.clear("n", "ab" * 20, origin="elsewhere")
            await wait_until(lambda: listener not in listeners())  # it has ended
        [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "stopped listening" in record.getMessage()
        assert "OSError" in record.getMessage()
        assert "secret detail" not in caplog.text
    finally:
        await backend.aclose()
        await other.aclose()


@pytest.mark.anyio
async def test_after_aclose_the_listener_hands_on_no_reset(tmp_path: Path) -> None:
    """aclose() stops the loop's listener of resets: it ends, so a reset logged afterwards is
    not heard (a later claim starts a new listener, which hears the resets after it only)."""
    backend, other = FileLockBackend(tmp_path / "locks"), FileLockBackend(tmp_path / "locks")
    heard: list[Reset] = []
    backend.bind(heard.append)
    try:
        listener = await _listening(backend, "ab" * 20)
        await backend.aclose()
        await wait_until(lambda: listener not in listeners())  # it has ended
        await other.clear("n", "ab" * 20, origin="before")  # no listener of backend's to hear
        await _a_new_claim_hears_the_next_reset(backend, other, heard)
    finally:
        await backend.aclose()
        await other.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "stranger",
    [
        {"value": "1", "made": 0, "expires": "soon"},
        {"cool_until": "later"},
        {"value": "1", "made": "x"},
        {"value": "1"},
        {"value": "1", "made": None},
        {"value": 5, "made": 0},
    ],
)
async def test_a_marker_of_our_record_that_the_store_did_not_write_is_overwritten(
    tmp_path: Path, stranger: dict[str, Any]
) -> None:
    """A marker file that names the record but whose fields are not the store's (another
    program's, a damaged one) is no marker: the claim leads, and the leader's value replaces
    it, rather than every claim failing on it."""
    backend = FileLockBackend(tmp_path / "locks")
    try:
        first = await backend.claim("n", UNKEYED, lease=1, refresh=60, holder="test")
        assert isinstance(first, Lease)
        await backend.abandon(first, cooldown=None)
        (marker,) = [p for p in (tmp_path / "locks").iterdir() if p.name.startswith("n-")]
        marker = marker.with_suffix(".json")
        marker.write_text(json.dumps({"name": "n", "key": UNKEYED, **stranger}))
        lease = await backend.claim("n", UNKEYED, lease=1, refresh=60, holder="test")
        assert isinstance(lease, Lease)
        assert await backend.complete(lease, "2", ttl=None)
        assert await backend.claim("n", UNKEYED, lease=1, refresh=60, holder="t") == Served("2")
    finally:
        await backend.aclose()
