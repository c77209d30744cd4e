"""FileLockBackend: the lease store of the processes of one host: ``flock`` and marker files."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._errors import BackendError
from ._base import DEFAULT_WAIT_TIMEOUT, seconds
from ._lease import StoreBackend
from ._store import UNKEYED, Claim, Cooling, Held, Lease, Reset, Served, Watch
from ._wakeups import Listeners, Wakeups

_RESETS = "resets.log"  # one JSON line per reset, appended; the listeners poll its size
_RESETS_MAX = 1 << 20  # past this many bytes the next reset starts the log again
_LISTEN_EVERY = 0.2  # seconds between a listener's looks at the resets log
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC


class FileLockBackend(StoreBackend):
    """Run a once's work once across the processes of one host, with lock and marker files.

    The leader holds an ``flock`` on the record's lock file while the work runs, and writes the
    record's marker file before unlocking; the kernel ends the lock with the leader's process, so
    no second leader starts while the first lives (fencing tokens are None). Followers try the
    lock every ``poll_interval`` seconds. A keyed once's keys share 256 lock files (keys sharing
    one wait for each other's runs). A reset reaches every live process through a log that a
    listener per event loop polls every 0.2 s. Asyncio and trio, on a POSIX system; one host, or
    a filesystem whose ``flock`` works across hosts (not NFS as commonly mounted). A leader that
    forks a child which outlives it keeps the lock until the child exits too.

    The directory is private: created 0700 at first use (the constructor touches nothing),
    refused if it is a symlink, another user's, or writable by group or others; its files are
    created 0600 and opened without following symlinks. Lock files are never deleted (two
    processes could then lock two different files).

    Args:
        directory: where the lock and marker files live; created (mode 0700) if missing.
            Default: ``fastapi_once-<uid>`` in the system temp dir (``$TMPDIR``, ``/tmp``), private
            to this user.
        wait_timeout: the longest a follower waits for the leader, in seconds (default
            300 s); None waits as long as the leader runs.
        ttl: the default life of an unkeyed once's value in seconds (``run_once(ttl=)``
            overrides it); None keeps it until :meth:`reset`.
        poll_interval: how often a follower tries the lock, in seconds (default 0.01).

    Raises:
        ValueError: a timeout or interval is not a positive number.
        PermissionError: (at first use) the directory is a symlink, owned by another user, or
            writable by group or others.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        ttl: float | None = None,
        poll_interval: float = 0.01,
    ) -> None:
        super().__init__(wait_timeout=wait_timeout, ttl=ttl, max_value_bytes=None)
        self._directory = None if directory is None else os.path.abspath(os.fspath(directory))
        self.poll_interval: float = seconds("poll_interval", poll_interval)
        self._private: _PrivateDirectory | None = None  # made at first use (see _files)
        # The listener of resets per event loop: an asyncio task (Listeners), or a trio system
        # task and its scope, by trio token. Each loop's own thread touches its entry only.
        self._listeners = Listeners(self._listen_asyncio)
        self._trio: weakref.WeakKeyDictionary[Any, anyio.CancelScope] = weakref.WeakKeyDictionary()
        # Per asyncio loop, where its listener starts reading the log (handed from _listen).
        self._offsets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
            weakref.WeakKeyDictionary()
        )
        self._written = 0  # records written by this backend: every 64th prunes expired markers

    @property
    def directory(self) -> str:
        """The directory of the lock and marker files."""
        if self._directory is None:
            self._directory = os.path.join(tempfile.gettempdir(), f"fastapi_once-{os.geteuid()}")
        return self._directory

    def describe(self) -> str:
        """Return ``FileLockBackend(<directory>)``."""
        return f"FileLockBackend({self.directory})"

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """See :meth:`LeaseStore.claim`; the lease is the lock file's ``flock``."""
        with _failures(self):
            await self._listen()
            # One trip to a worker thread, shielded: a cancellation must not lose a lock taken.
            with anyio.CancelScope(shield=True):
                claim = await anyio.to_thread.run_sync(self._claim, name, key, refresh, holder)
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            if isinstance(claim, Lease):
                _unlock(claim.handle)
            raise
        return claim

    def _claim(self, name: str, key: str, refresh: float | None, holder: str) -> Claim:
        found = self._read(name, key)
        served = _servable(found, refresh, taken=False)
        if served is not None:
            return served
        fd = self._open_lock(name, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            taken = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or None
            os.close(fd)
            return _servable(found, None, taken=True) or Held(taken)
        try:  # the lock is ours: a leader before us may have finished meanwhile
            served = _servable(self._read(name, key), refresh, taken=False)
            if served is None:
                os.ftruncate(fd, 0)  # tell waiting followers (and their errors) who leads
                os.pwrite(fd, holder.encode(), 0)
                return Lease(name, key, None, fd)
        except BaseException:
            _unlock(fd)
            raise
        _unlock(fd)
        return served

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """The lock lasts as long as its open file: nothing to renew."""
        return True

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """Write the record's marker, then unlock (see :meth:`LeaseStore.complete`)."""
        now = time.time()
        marker = {"value": value, "made": now, "expires": None if ttl is None else now + ttl}
        try:
            with _failures(self):
                await anyio.to_thread.run_sync(self._write, lease.name, lease.key, marker)
                self._written += 1
                if lease.key != UNKEYED and self._written % 64 == 0:
                    await anyio.to_thread.run_sync(self._prune, lease.name)
        finally:
            _unlock(lease.handle)
        return True

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """Record ``cooldown`` (keeping a value), then unlock."""
        try:
            if cooldown is not None:
                found = await anyio.to_thread.run_sync(self._read, lease.name, lease.key)
                marker = found or {"value": None, "made": 0.0, "expires": None}
                marker["cool_until"] = time.time() + cooldown
                await anyio.to_thread.run_sync(self._write, lease.name, lease.key, marker)
        finally:
            _unlock(lease.handle)

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """Delete the marker(s), then append the reset to the log the listeners poll."""
        line = Reset(name, key, origin).to_json() + "\n"
        with _failures(self):
            await anyio.to_thread.run_sync(self._clear, name, key, line.encode())

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[Watch]:
        """Watch the record's lock (and the resets log): see :class:`LeaseStore.watch`."""
        with _failures(self):
            await self._listen()
            with anyio.CancelScope(shield=True):  # the descriptor is closed below, whatever
                fd = await anyio.to_thread.run_sync(self._open_lock, name, key)
        try:
            await anyio.lowlevel.checkpoint()
            yield _FileWatch(fd, self, self._resets_size())
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        """Stop the running event loop's listener of resets (it restarts on next use)."""
        try:
            await self._listeners.stop()
        except RuntimeError:  # not asyncio
            scope = self._trio.pop(anyio.lowlevel.current_token().native_token, None)
            if scope is not None:
                scope.cancel()

    async def _listen(self) -> None:
        """Start the running loop's listener of resets unless it runs."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            import trio

            token = trio.lowlevel.current_trio_token()
            if token not in self._trio:
                scope = self._trio[token] = anyio.CancelScope()
                offset = await anyio.to_thread.run_sync(self._resets_size)
                trio.lowlevel.spawn_system_task(self._poll_resets, scope, offset)
            return
        loop = asyncio.get_running_loop()
        if loop not in self._listeners:
            # Read before the listener starts: a reset appended after this call is heard.
            offset = await anyio.to_thread.run_sync(self._resets_size)
            if loop not in self._listeners:
                self._offsets[loop] = offset
                self._listeners.start()

    async def _listen_asyncio(self, wakeups: Wakeups) -> None:
        offset = self._offsets.pop(asyncio.get_running_loop(), 0)
        await self._poll_resets(anyio.CancelScope(), offset)

    async def _poll_resets(self, scope: anyio.CancelScope, offset: int) -> None:
        """Until cancelled: every 0.2 s, hand each reset appended to the log to ``heard``."""
        with scope:
            while True:
                await anyio.sleep(_LISTEN_EVERY)
                try:
                    lines, offset = await anyio.to_thread.run_sync(self._read_resets, offset)
                except OSError:
                    continue  # the directory went away or is not ours: try again later
                for line in lines:
                    reset = Reset.from_json(line)
                    if reset is not None:
                        self.heard(reset)

    @property
    def _files(self) -> _PrivateDirectory:
        if self._private is None:  # a benign race: two equal objects, one kept
            self._private = _PrivateDirectory(self.directory, self.describe())
        return self._private

    def _open_lock(self, name: str, key: str) -> int:
        # One lock file per unkeyed once; a keyed once's keys share 256 (by digest).
        suffix = "" if key == UNKEYED else f".{key[:2]}"
        return self._files.open(f"{_file_key(name)}{suffix}.lock", os.O_RDWR | os.O_CREAT)

    def _load(self, filename: str) -> Any:
        """The JSON in ``filename``, or None if it is missing or not JSON."""
        try:
            with os.fdopen(self._files.open(filename, os.O_RDONLY), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def _read(self, name: str, key: str) -> dict[str, Any] | None:
        """The record's marker (expired parts dropped), or None if there is none valid."""
        marker = self._load(_marker(name, key))
        try:
            # Names are hashed into file names: the marker says whose it is.
            if marker["name"] != name or marker["key"] != key:
                return None
            now = time.time()
            if marker["expires"] is not None and now >= marker["expires"]:
                marker["value"] = None
            if marker.get("cool_until") is not None and now >= marker["cool_until"]:
                marker["cool_until"] = None
        except (KeyError, TypeError):
            return None  # none, or not a marker this backend wrote; the leader overwrites it
        return dict(marker)

    def _write(self, name: str, key: str, marker: dict[str, Any]) -> None:
        data = json.dumps({**marker, "name": name, "key": key}).encode()
        filename = _marker(name, key)
        tmp = f"{filename}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        directory = self._files.fd
        fd = self._files.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(fd)
        except BaseException:
            os.unlink(tmp, dir_fd=directory)
            raise
        finally:
            os.close(fd)
        # Readers see the old marker or the whole new one, never a partial file.
        os.replace(tmp, filename, src_dir_fd=directory, dst_dir_fd=directory)
        os.fsync(directory)

    def _markers(self, name: str) -> list[str]:
        prefix = f"{_file_key(name)}."
        return [
            f for f in os.listdir(self._files.fd) if f.startswith(prefix) and f.endswith(".json")
        ]

    def _prune(self, name: str) -> None:
        """Delete the expired markers of ``name``'s keys."""
        now = time.time()
        for filename in self._markers(name):
            with contextlib.suppress(OSError, KeyError, TypeError):
                marker = self._load(filename)
                expired = marker["expires"] is not None and marker["expires"] <= now
                if expired and (marker.get("cool_until") or 0) <= now:
                    os.unlink(filename, dir_fd=self._files.fd)

    def _clear(self, name: str, key: str | None, line: bytes) -> None:
        for filename in [_marker(name, key)] if key is not None else self._markers(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filename, dir_fd=self._files.fd)
        fd = self._files.open(_RESETS, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # writers one at a time; readers read whole lines
            if os.fstat(fd).st_size > _RESETS_MAX:
                os.ftruncate(fd, 0)  # listeners past the end read again from the start
            os.write(fd, line)
        finally:
            os.close(fd)

    def _resets_size(self) -> int:
        try:
            return os.stat(_RESETS, dir_fd=self._files.fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            return 0

    def _read_resets(self, offset: int) -> tuple[list[bytes], int]:
        """The whole lines appended to the resets log since ``offset``, and the new offset."""
        try:
            fd = self._files.open(_RESETS, os.O_RDONLY)
        except FileNotFoundError:
            return [], 0
        try:
            size = os.fstat(fd).st_size
            if size < offset:  # started again
                offset = 0
            data = os.pread(fd, size - offset, offset)
        finally:
            os.close(fd)
        whole = data[: data.rfind(b"\n") + 1]
        return whole.splitlines(), offset + len(whole)


class _FileWatch(Watch):
    """A follower's watch: tries the record's lock in shared mode, and looks at the resets log."""

    def __init__(self, fd: int, backend: FileLockBackend, resets: int) -> None:
        self._fd = fd
        self._backend = backend
        self._resets = resets

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 - the protocol's
        """Return once no leader holds the lock, or a reset was logged, or after ``timeout``."""
        with anyio.move_on_after(timeout):
            while True:
                try:
                    # Followers share the lock, so none delays another; let go at once, or
                    # the followers' attempts to lead would fail while one reads the marker.
                    fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    pass
                size = self._backend._resets_size()
                if size != self._resets:
                    self._resets = size
                    return
                await anyio.sleep(self._backend.poll_interval)


def _servable(found: dict[str, Any] | None, refresh: float | None, *, taken: bool) -> Claim | None:
    """What a marker gives without the lock: a value to serve, a cooldown, or None (lead)."""
    if found is None:
        return None
    value, cooling = found.get("value"), found.get("cool_until") is not None
    if value is not None:
        fresh = refresh is None or time.time() - found["made"] < refresh
        if fresh or taken or cooling:
            return Served(value)
    elif cooling:
        return Cooling(found["cool_until"] - time.time())
    return None


def _unlock(fd: int) -> None:
    # LOCK_UN releases the lock even if a child forked by the work still shares the file.
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class _PrivateDirectory:
    """The store's directory (see FileLockBackend), opened at first use, and its files.

    Every file is opened relative to the directory's descriptor, so the directory checked once is
    the one used, even if its path is later replaced.
    """

    def __init__(self, path: str, owner: str) -> None:
        self.path = path
        self._owner = owner  # who uses it, for messages
        self._fd: int | None = None  # set once under _opening; closed with this object
        self._opening = threading.Lock()

    @property
    def fd(self) -> int:
        """The directory's descriptor, opening (creating, checking) it at first use."""
        with self._opening:
            if self._fd is None:
                self._fd = self._open_directory()
                weakref.finalize(self, os.close, self._fd)
            return self._fd

    def open(self, filename: str, flags: int) -> int:
        """Open ``filename`` in the directory (0600 if created), this user's regular file only."""
        try:
            fd = os.open(filename, flags | _OPEN, 0o600, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise PermissionError(
                f"{self._owner}: {filename} is a symlink; the backend does not follow "
                "symlinks in its directory. Remove it"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise PermissionError(
                f"{self._owner}: {filename} is not a regular file owned by this process's user; "
                "remove it"
            )
        return fd

    def _open_directory(self) -> int:
        path = self.path
        os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
        except OSError as exc:
            if os.path.islink(path):
                raise PermissionError(
                    f"{self._owner}: the directory is a symlink; give the real path of a "
                    "private directory"
                ) from None
            raise PermissionError(f"{self._owner}: cannot open the directory: {exc}") from exc
        st = os.fstat(fd)
        problem = None
        if st.st_uid != os.geteuid():
            problem = (
                f"is owned by uid {st.st_uid}, not by this process's user (uid {os.geteuid()})"
            )
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        if problem is not None:
            os.close(fd)
            raise PermissionError(
                f"{self._owner}: the directory {problem}; other users could forge or hold its "
                f"locks. Use a private directory (chmod 700 {path}) owned by this user"
            )
        return fd


@contextlib.contextmanager
def _failures(store: FileLockBackend) -> Iterator[None]:
    """An OSError of the directory (read-only, full...) is a BackendError naming the store; a
    PermissionError (not this user's, a symlink) goes on as it is: it says what to fix."""
    try:
        yield
    except PermissionError:
        raise
    except OSError as exc:
        what = exc.strerror or type(exc).__name__
        raise BackendError(f"{store.describe()}: the directory cannot be used ({what})") from exc


def _marker(name: str, key: str) -> str:
    return _file_key(name) + ("" if key == UNKEYED else f".{key}") + ".json"


def _file_key(name: str) -> str:
    """A file name for ``name``: readable, safe, and unique (a hash of the whole name)."""
    readable = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).lstrip(".")[:60]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
