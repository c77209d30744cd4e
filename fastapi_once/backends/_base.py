"""The contract every cross-process backend fulfils."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any


class Backend(abc.ABC):
    """Makes a piece of work run once across every process that shares the backend.

    ``once(fn, across=backend)`` calls :meth:`run_once` from the in-process single-flight
    attempt, so inside one process concurrent callers already share one call of it.
    """

    @abc.abstractmethod
    async def run_once(
        self, name: str, work: Callable[[], Awaitable[Any]], *, ttl: float | None = None
    ) -> Any:
        """Return the recorded result of ``name``, running ``work`` first if no process has.

        A fast "already done?" check comes before any lock. Otherwise take the lock, re-check
        the marker, run ``work()`` as leader, record its (JSON-serialisable) result and the
        marker (expiring after ``ttl`` seconds if given), release the lock, and return the
        result as JSON decodes it. Followers wait (never skip) and return the leader's recorded
        result; when a leader fails or dies, no marker is written and one follower becomes
        leader. Every process gets the same JSON-decoded result, the leader included.

        Raises:
            TypeError: the result is not JSON-serialisable.
            TimeoutError: a follower waited longer than the backend's ``wait_timeout``.
            Exception: what ``work`` raised, in the process that ran it.
        """

    @abc.abstractmethod
    async def reset(self, name: str) -> None:
        """Clear ``name``'s marker and result, so that the next ``run_once`` runs the work."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections the backend holds."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for errors, logs and status; never includes secrets."""
