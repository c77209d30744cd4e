"""FileLockBackend: the lease store of the processes of one host: ``flock`` and marker files."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
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
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._errors import BackendError
from .._logs import error_type, fields
from ._base import DEFAULT_WAIT_TIMEOUT, seconds
from ._lease import StoreBackend, logger
from ._store import UNKEYED, Claim, Cooling, Held, Lease, Reset, Served, Watch

T = TypeVar("T")

_RESETS = "resets.log"  # one JSON line per reset, appended; the listeners poll its size
_RESETS_MAX = 1 << 20  # past this many bytes the next reset starts the log again
_LISTEN_EVERY = 0.2  # seconds between a listener's looks at the resets log
_LISTENER = "fastapi_once resets listener"  # its task's name (asyncio and trio)


class FileLockBackend(StoreBackend):
    """Run a once's work once across the processes of one host, with lock and marker files.

    The leader holds an ``flock`` on the record's lock file while the work runs and writes the
    record's marker file before unlocking; the lock ends with the leader's process (fencing
    tokens are None). Followers try the lock every ``poll_interval`` seconds; a reset reaches
    every live process through a log that each event loop's listener polls. Asyncio and trio,
    on a POSIX system, one host (not NFS). How the files are kept: ``docs/across.md``.

    Args:
        directory: where the lock and marker files live, created (mode 0700) at first use if
            missing (default: ``fastapi_once-<uid>`` in the system temp dir).
        wait_timeout: the longest a follower waits for the leader, in seconds (default 300;
            None: no bound).
        ttl: an unkeyed once's value's default life in seconds, which ``run_once(ttl=)``
            overrides (None: until :meth:`reset`).
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
        # The directory's descriptor, opened and checked at first use under _opening: files are
        # opened relative to it, so the directory checked is the one used even if replaced.
        self._fd: int | None = None
        self._opening = threading.Lock()
        # Per event loop (an asyncio loop, a trio token), the cancel scope of its listener of
        # resets. Each loop's own thread touches its entry only; the entry goes with the loop.
        self._listening: weakref.WeakKeyDictionary[Any, anyio.CancelScope]
        self._listening = weakref.WeakKeyDictionary()
        self._written = 0  # markers written by this backend: every 64th prunes expired ones

    @property
    def directory(self) -> str:
        """The directory of the lock and marker files."""
        if self._directory is None:  # the constructor touches nothing, gettempdir() does
            self._directory = os.path.join(tempfile.gettempdir(), f"fastapi_once-{os.geteuid()}")
        return self._directory

    def describe(self) -> str:
        """Return ``FileLockBackend(<directory>)``."""
        return f"FileLockBackend({self.directory})"

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """See :meth:`LeaseStore.claim`; the lease is the lock file's ``flock``."""
        claim = await self._io(self._claim, name, key, refresh, holder)
        try:
            self._listen()
            await anyio.lowlevel.checkpoint()
        except BaseException:  # cancelled: the lock taken is let go
            if isinstance(claim, Lease):
                _unlock(claim.handle)
            raise
        return claim

    def _claim(self, name: str, key: str, refresh: float | None, holder: str) -> Claim:
        found = self._read(name, key)
        if served := _servable(found, refresh):
            return served
        fd, claim = self._open_lock(name, key), None
        try:  # the lock file is let go (and closed) unless it is the lease's
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                taken = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or None
                return _servable(found, None) or Held(taken)
            # The lock is ours: a leader before us may have finished meanwhile.
            if not (claim := _servable(self._read(name, key), refresh)):
                os.ftruncate(fd, 0)  # tell waiting followers (and their errors) who leads
                os.pwrite(fd, holder.encode(), 0)
                claim = Lease(name, key, None, fd)
            return claim
        finally:
            if not isinstance(claim, Lease):
                _unlock(fd)

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """The lock lasts as long as its open file: nothing to renew."""
        return True

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """See :meth:`LeaseStore.complete`: write the record's marker, then unlock."""
        now = time.time()
        expires = None if ttl is None else now + ttl
        await self._end(lease, {"value": value, "made": now, "expires": expires})
        return True

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """See :meth:`LeaseStore.abandon`: record the cooldown (keeping a value), then unlock."""
        await self._end(lease, None if cooldown is None else {"cool_until": time.time() + cooldown})

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """See :meth:`LeaseStore.clear`: delete the marker(s), then log the reset."""
        await self._io(self._clear, Reset(name, key, origin))

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[Watch]:
        """See :meth:`LeaseStore.watch`: the record's lock file, and the resets log."""
        fd = await self._io(self._open_lock, name, key)  # closed below, whatever
        try:
            self._listen()
            yield _FileWatch(fd, self, self._resets_size())
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        """Stop the running event loop's listener of resets (it restarts on next use)."""
        scope = self._listening.pop(anyio.lowlevel.current_token().native_token, None)
        if scope is not None:
            scope.cancel()

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a worker thread, whose result comes back even if the caller is
        cancelled (a lock taken is never lost); errors as :meth:`_errors`."""
        with self._errors():
            return await anyio.to_thread.run_sync(call, *args)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """An OSError in the block is a BackendError naming the store, except a PermissionError
        (a symlink, another user's file): it says what to fix."""
        try:
            yield
        except PermissionError:
            raise
        except OSError as exc:
            what = exc.strerror or type(exc).__name__
            raise BackendError(f"{self.describe()}: the directory cannot be used ({what})") from exc

    def _listen(self) -> None:
        """Start the running loop's listener of resets unless it runs: it hears every reset
        appended to the log after this call (the directory is open)."""
        loop = anyio.lowlevel.current_token().native_token
        if loop in self._listening:
            return
        offset = self._resets_size()  # before the entry: if it fails, the next call tries again
        scope = self._listening[loop] = anyio.CancelScope()
        if isinstance(loop, asyncio.AbstractEventLoop):
            # In an empty context: not the caller's attempt (its wait-for edges), nor its trace.
            # Its timer or worker thread holds the task while it waits (asyncio's are weak).
            poll = self._poll_resets(loop, scope, offset)
            contextvars.Context().run(loop.create_task, poll, name=_LISTENER)
        else:
            import trio

            trio.lowlevel.spawn_system_task(self._poll_resets, loop, scope, offset, name=_LISTENER)

    async def _poll_resets(self, loop: object, scope: anyio.CancelScope, offset: int) -> None:
        """Until cancelled: every 0.2 s, hand each reset appended to the log to ``heard``."""
        try:
            with scope:
                while True:
                    await anyio.sleep(_LISTEN_EVERY)
                    # Abandoned when cancelled: after aclose() nothing read is handed on.
                    resets, offset = await anyio.to_thread.run_sync(
                        self._read_resets, offset, abandon_on_cancel=True
                    )
                    for reset in resets:  # an error of heard() is a defect: said below
                        self.heard(reset)
        except Exception as exc:  # a defect: said, and the loop's next claim listens again
            kind = error_type(exc)
            said = "%s stopped listening for resets (%s); the next call listens again"
            extra = fields(None, "listener_failed", error_type=kind)
            logger.error(said, self.describe(), kind, extra=extra)
        finally:
            if self._listening.get(loop) is scope:
                del self._listening[loop]

    def _dir(self) -> int:
        """The directory's descriptor, opening (creating, checking) it at first use."""
        with self._opening:
            if self._fd is None:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                self._fd = self._open(self.directory, os.O_RDONLY, directory=True)
                weakref.finalize(self, os.close, self._fd)
            return self._fd

    def _open(self, path: str, flags: int, *, directory: bool = False) -> int:
        """Open ``path`` without following a symlink: the store's directory (this user's, not
        writable by others), or a file in it (this user's regular file; 0600 if created)."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600, dir_fd=None if directory else self._dir())
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            problem = "is a symlink, which the backend does not follow (give the real path)"
        else:
            st, me = os.fstat(fd), os.geteuid()
            if st.st_uid != me:
                problem = f"is owned by uid {st.st_uid}, not by this process's user (uid {me})"
            elif directory and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
            elif not directory and not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            else:
                return fd
            os.close(fd)
        raise PermissionError(
            f"{self.describe()}: {path} {problem}; other users could forge or hold its locks. "
            f"Use a private directory (chmod 700 {self.directory}) holding this user's files "
            "only, and no symlinks"
        )

    def _open_lock(self, name: str, key: str) -> int:
        # One lock file per unkeyed once; a keyed once's keys share 256 (by digest). Lock files
        # are never deleted: two processes could then lock two different files.
        shared = key if key == UNKEYED else key[:2]
        return self._open(_file(name, shared, ".lock"), os.O_RDWR | os.O_CREAT)

    def _read(self, name: str, key: str) -> dict[str, Any] | None:
        """The record's marker, or None if there is none valid."""
        try:
            with os.fdopen(self._open(_file(name, key, ".json"), os.O_RDONLY), "rb") as f:
                marker = dict(json.loads(f.read()))
        except (FileNotFoundError, ValueError, TypeError):
            return None  # none, or not a marker this backend wrote; the leader overwrites it
        # Names are hashed into file names: the marker says whose it is, and holds its fields
        # as the store writes them (a value with when it was made, times as numbers).
        value, times = marker.get("value"), [marker.get("expires"), marker.get("cool_until")]
        if (
            (marker.get("name"), marker.get("key")) != (name, key)
            or not isinstance(value, str | None)
            or (value is not None and type(marker.get("made")) not in (int, float))
            or not all(t is None or type(t) in (int, float) for t in times)
        ):
            return None
        return marker

    async def _end(self, lease: Lease, change: dict[str, Any] | None) -> None:
        """Write ``change`` (if any) to the lease's marker, then unlock, even if cancelled."""
        try:
            if change is not None:
                await self._io(self._write, lease.name, lease.key, change)
        finally:
            _unlock(lease.handle)

    def _write(self, name: str, key: str, change: dict[str, Any]) -> None:
        """Write ``change`` to the record's marker (a cooldown alone keeps its value); every
        64th marker written prunes the expired ones of the once's keys."""
        directory = self._dir()
        if "value" not in change:
            change = {**(self._read(name, key) or {}), **change}
        filename = _file(name, key, ".json")
        tmp = f"{filename}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with os.fdopen(self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
                f.write(json.dumps({**change, "name": name, "key": key}).encode())
                f.flush()
                os.fsync(f.fileno())
            # Readers see the old marker or the whole new one, never a partial file.
            os.replace(tmp, filename, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=directory)
            raise
        os.fsync(directory)
        self._written += 1
        if key != UNKEYED and self._written % 64 == 0:  # prune: neither a value nor a cooldown
            for other, file in self._markers(name).items():
                with contextlib.suppress(OSError):  # gone meanwhile, or not ours (a symlink)
                    marker = self._read(name, other)
                    if marker and _servable(marker, None) is None:
                        os.unlink(file, dir_fd=directory)

    def _markers(self, name: str) -> dict[str, str]:
        """The marker files of ``name``'s keys, by key."""
        prefix = f"{_file_key(name)}."
        return {
            f[len(prefix) : -len(".json")]: f
            for f in os.listdir(self._dir())
            if f.startswith(prefix) and f.endswith(".json")
        }

    def _clear(self, reset: Reset) -> None:
        name, key = reset.name, reset.key
        markers = [_file(name, key, ".json")] if key is not None else self._markers(name).values()
        for filename in markers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(filename, dir_fd=self._dir())
        fd = self._open(_RESETS, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # writers one at a time; readers read whole lines
            if os.fstat(fd).st_size > _RESETS_MAX:
                os.ftruncate(fd, 0)  # listeners past the end read again from the start
            os.write(fd, f"{reset.to_json()}\n".encode())
        finally:
            os.close(fd)

    def _resets_size(self) -> int:
        """The resets log's size (0 while there is none); errors as :meth:`_errors`."""
        with self._errors():
            try:
                return os.stat(_RESETS, dir_fd=self._dir(), follow_symlinks=False).st_size
            except FileNotFoundError:
                return 0

    def _read_resets(self, offset: int) -> tuple[list[Reset], int]:
        """The resets in the whole lines appended to the log since ``offset`` (0 if the log
        started again since), and the new offset; none while the log cannot be read (gone: the
        next one starts at 0; or not ours)."""
        try:
            with os.fdopen(self._open(_RESETS, os.O_RDONLY), "rb") as log:
                size = os.fstat(log.fileno()).st_size
                offset = offset if offset <= size else 0
                data = os.pread(log.fileno(), size - offset, offset)
        except OSError as exc:
            return [], 0 if isinstance(exc, FileNotFoundError) else offset
        whole = data[: data.rfind(b"\n") + 1]
        resets = [Reset.from_json(line) for line in whole.splitlines()]
        return [r for r in resets if r is not None], offset + len(whole)


@dataclass
class _FileWatch(Watch):
    """A follower's watch: tries the record's lock in shared mode, and looks at the resets log."""

    _fd: int
    _backend: FileLockBackend
    _resets: int  # the log's size last seen

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 - the protocol's
        """Return once no leader holds the lock, or a reset was logged, or after ``timeout``."""
        with anyio.move_on_after(timeout):
            while True:
                with contextlib.suppress(BlockingIOError):
                    # Followers share the lock, so none delays another; let go at once, or
                    # the followers' attempts to lead would fail while one reads the marker.
                    fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    return
                if (size := self._backend._resets_size()) != self._resets:
                    self._resets = size
                    return
                await anyio.sleep(self._backend.poll_interval)


def _servable(found: dict[str, Any] | None, refresh: float | None) -> Claim | None:
    """What a marker gives: a live value to serve (any, if ``refresh`` is None: another leads),
    a cooldown not yet ended, or None (lead)."""
    if found is None:
        return None
    now, expires = time.time(), found.get("expires")
    cooling = found.get("cool_until") is not None and now < found["cool_until"]
    if found.get("value") is not None and (expires is None or now < expires):
        if refresh is None or cooling or now - found["made"] < refresh:
            return Served(found["value"])
    elif cooling:
        return Cooling(found["cool_until"] - now)
    return None


def _unlock(fd: int) -> None:
    # LOCK_UN releases the lock even if a child forked by the work still shares the file.
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _file(name: str, key: str, suffix: str) -> str:
    """The name of a file of ``name``'s record for ``key`` (a digest, or UNKEYED: no key)."""
    return _file_key(name) + ("" if key == UNKEYED else f".{key}") + suffix


def _file_key(name: str) -> str:
    """A file name for ``name``: readable, safe, and unique (a hash of the whole name)."""
    readable = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).lstrip(".")[:60]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
