"""FileLockBackend: an ``flock`` per once in a private directory; the processes of one host."""

from __future__ import annotations

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
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

from .._errors import WaitTimeoutError
from ._base import DEFAULT_WAIT_TIMEOUT, Backend, holder_id, seconds
from ._codec import encode_json

_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC


class FileLockBackend(Backend):
    """Run a once's work once across the processes of one host, with a lock file per once.

    The leader holds an exclusive ``flock`` on ``<directory>/<name>.lock`` while the work runs and
    then writes ``<name>.json`` (the marker, with the result) atomically before unlocking. The
    kernel drops the lock when the leader's process dies, so a follower takes over at once.
    Followers wait for the lock in shared mode, trying it without blocking every
    ``poll_interval`` seconds, so all of them see the leader's end within that interval, together
    (not one after another); if the leader left no marker (it failed or died), they race to lead.
    Works on asyncio and trio; needs only the standard library and a POSIX system.

    The directory is private: created with mode 0700 if missing, refused if it is a symlink,
    owned by another user, or writable by group or others; files are created 0600 and opened
    without following symlinks. Lock files are never deleted (deleting a lock file that another
    process has open would let two processes lock two different files). The constructor touches
    nothing: the directory is created and checked at first use.

    Limits: processes on one host only, or a shared filesystem whose ``flock`` works across
    hosts (not NFS as commonly mounted). A leader that forks a child which outlives it keeps the
    lock until the child exits too.

    Args:
        directory: where the lock and marker files live; created (mode 0700) if missing.
            Default: ``fastapi_once-<uid>`` in the system temp dir (``$TMPDIR``, ``/tmp``), private
            to this user.
        wait_timeout: the longest a follower waits for the leader, in seconds (default
            300 s); None waits as long as the leader runs.
        ttl: the default life of a marker in seconds (``run_once(ttl=)`` overrides it); None
            keeps markers until :meth:`reset`.
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
        self._directory = None if directory is None else os.path.abspath(os.fspath(directory))
        self.wait_timeout = seconds("wait_timeout", wait_timeout)
        self.ttl = seconds("ttl", ttl)
        self.poll_interval: float = seconds("poll_interval", poll_interval)
        # Every file is opened relative to this descriptor, so the directory checked once is the
        # one used, even if its path is later replaced. Set once under _opening, closed with the
        # backend.
        self._dir_fd: int | None = None
        self._opening = threading.Lock()

    @property
    def directory(self) -> str:
        """The directory of the lock and marker files."""
        if self._directory is None:
            self._directory = os.path.join(tempfile.gettempdir(), f"fastapi_once-{os.geteuid()}")
        return self._directory

    def describe(self) -> str:
        """Return ``FileLockBackend(<directory>)``."""
        return f"FileLockBackend({self.directory})"

    async def reset(self, name: str) -> None:
        """Delete ``name``'s marker, so that the next :meth:`run_once` runs the work.

        Args:
            name: the once's name (``once(...).name``).
        """
        await anyio.to_thread.run_sync(self._unlink_marker, _file_key(name))

    async def run_once(
        self,
        name: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
    ) -> Any:
        """Return ``name``'s recorded result, running ``work`` first if no process has.

        Args:
            name: the once's name, its identity across processes.
            work: makes the result (runs in this process only if it becomes the leader).
            ttl: seconds the marker stays valid; default the backend's ``ttl``.

        Raises:
            TypeError: the result is not JSON-serialisable (nothing is recorded).
            WaitTimeoutError: a follower waited longer than ``wait_timeout``.
            PermissionError: the directory or a file in it is not private (see above).
            Exception: what ``work`` raised, in the process that ran it.
        """
        ttl = self.ttl if ttl is None else seconds("ttl", ttl)
        started = time.monotonic()
        key = _file_key(name)
        found = await anyio.to_thread.run_sync(self._read_marker, key, name)
        if found is not None:
            return json.loads(found)
        fd = await anyio.to_thread.run_sync(self._open_lock, key)
        try:
            found = await self._lead_or_follow(fd, key, name, started)
            if found is not None:
                return json.loads(found)
            value = await work()
            text = encode_json(name, value, self.describe())
            await anyio.to_thread.run_sync(self._write_marker, key, name, text, ttl)
            return json.loads(text)
        finally:
            # LOCK_UN releases the lock even if a child forked by the work still shares the file.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    async def _lead_or_follow(self, fd: int, key: str, name: str, started: float) -> str | None:
        """Return the recorded result, or None once ``fd`` holds the exclusive lock (leader)."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                # The lock is ours: a leader before us may have finished while we waited.
                return await anyio.to_thread.run_sync(self._read_marker_and_claim, fd, key, name)
            await self._wait_shared(fd, name, started)
            # Let go at once: a shared lock held while the marker is read would make the other
            # followers' attempts to lead fail, over and over, if the leader left no marker.
            fcntl.flock(fd, fcntl.LOCK_UN)
            # The leader is gone; it wrote its marker before unlocking, if it succeeded.
            found = await anyio.to_thread.run_sync(self._read_marker, key, name)
            if found is not None:
                return found
            # It failed or died: race the other followers to lead.

    async def _wait_shared(self, fd: int, name: str, started: float) -> None:
        """Wait until ``fd`` gets the lock in shared mode (no leader holds it), at most
        ``wait_timeout``.

        Followers share the lock, so none of them delays another: all of them get it as soon
        as the leader lets go. LOCK_NB never blocks, so polling runs on the event loop and stays
        cancellable.
        """
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            waited = time.monotonic() - started
            if self.wait_timeout is not None and waited >= self.wait_timeout:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or None
                raise WaitTimeoutError(name, self.describe(), waited, holder)
            await anyio.sleep(self.poll_interval)

    # --- blocking file operations, run in a worker thread -----------------------------------------

    def _dir(self) -> int:
        """The directory's descriptor, opening (and creating, and checking) it at first use."""
        with self._opening:
            if self._dir_fd is None:
                self._dir_fd = _open_private_directory(self.directory)
                weakref.finalize(self, os.close, self._dir_fd)
            return self._dir_fd

    def _open(self, filename: str, flags: int) -> int:
        try:
            return os.open(filename, flags | _OPEN, 0o600, dir_fd=self._dir())
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise PermissionError(
                f"{self.describe()}: {filename} is a symlink; the backend does not follow "
                "symlinks in its directory. Remove it"
            ) from None

    def _open_lock(self, key: str) -> int:
        fd = self._open(f"{key}.lock", os.O_RDWR | os.O_CREAT)
        try:
            _check_own_file(fd, self.directory, f"{key}.lock")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read_marker(self, key: str, name: str) -> str | None:
        """Return the recorded result's JSON text, or None if there is no valid marker."""
        try:
            fd = self._open(f"{key}.json", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            _check_own_file(fd, self.directory, f"{key}.json")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        finally:
            os.close(fd)
        try:
            marker = json.loads(raw)
            result, expires = marker["result"], marker["expires_at"]
            # Names are hashed into file names: the marker says whose it is.
            if marker["name"] != name or not isinstance(result, str):
                return None
        except (ValueError, KeyError, TypeError):
            return None  # not a marker this backend wrote; the leader overwrites it
        if expires is not None and time.time() >= expires:
            return None
        return result

    def _read_marker_and_claim(self, fd: int, key: str, name: str) -> str | None:
        found = self._read_marker(key, name)
        if found is None:
            # Tell waiting followers (and their timeout errors) who holds the lock.
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_id().encode(), 0)
        return found

    def _write_marker(self, key: str, name: str, text: str, ttl: float | None) -> None:
        expires = None if ttl is None else time.time() + ttl
        data = json.dumps({"name": name, "result": text, "expires_at": expires}).encode()
        tmp = f"{key}.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(fd)
        except BaseException:
            os.unlink(tmp, dir_fd=self._dir())
            raise
        finally:
            os.close(fd)
        # Readers see the old marker or the whole new one, never a partial file.
        os.replace(tmp, f"{key}.json", src_dir_fd=self._dir(), dst_dir_fd=self._dir())
        os.fsync(self._dir())

    def _unlink_marker(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{key}.json", dir_fd=self._dir())


def _file_key(name: str) -> str:
    """A file name for ``name``: readable, safe, and unique (a hash of the whole name)."""
    readable = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).lstrip(".")[:60]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _open_private_directory(path: str) -> int:
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
    except OSError as exc:
        if os.path.islink(path):
            raise PermissionError(
                f"FileLockBackend({path}): the directory is a symlink; give the real path of "
                "a private directory"
            ) from None
        raise PermissionError(f"FileLockBackend({path}): cannot open the directory: {exc}") from exc
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by this process's user (uid {os.geteuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem is not None:
        os.close(fd)
        raise PermissionError(
            f"FileLockBackend({path}): the directory {problem}; other users could forge or hold "
            f"its locks. Use a private directory (chmod 700 {path}) owned by this user"
        )
    return fd


def _check_own_file(fd: int, directory: str, filename: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(
            f"FileLockBackend({directory}): {filename} is not a regular file owned by this "
            "process's user; remove it"
        )
