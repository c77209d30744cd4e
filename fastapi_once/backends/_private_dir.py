"""PrivateDirectory: a directory only this user can write, and the files in it, opened safely."""

from __future__ import annotations

import errno
import os
import stat
import threading
import weakref

_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC


class PrivateDirectory:
    """A directory created 0700 if missing and refused if it is a symlink, another user's, or
    writable by group or others; its files are created 0600, opened relative to it without
    following symlinks, and refused unless they are this user's regular files.

    Nothing is touched until the first use. Every file is opened relative to the directory's
    descriptor, so the directory checked once is the one used, even if its path is later
    replaced.

    Args:
        path: the directory.
        owner: who uses it, for messages (``FileLockBackend(<path>)``).
    """

    def __init__(self, path: str, owner: str) -> None:
        self.path = path
        self._owner = owner
        self._fd: int | None = None  # set once under _opening; closed with this object
        self._opening = threading.Lock()

    @property
    def fd(self) -> int:
        """The directory's descriptor, opening (creating, checking) it at first use.

        Raises:
            PermissionError: the directory is a symlink, another user's, or writable by others.
        """
        with self._opening:
            if self._fd is None:
                self._fd = self._open_directory()
                weakref.finalize(self, os.close, self._fd)
            return self._fd

    def open(self, filename: str, flags: int) -> int:
        """Open ``filename`` in the directory (0600 if created), this user's regular file only.

        Raises:
            PermissionError: it is a symlink, or not a regular file of this user.
            OSError: as ``os.open`` (FileNotFoundError without ``O_CREAT``).
        """
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
