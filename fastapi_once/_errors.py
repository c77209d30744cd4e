"""The exceptions fastapi_once raises of its own (misuse raises TypeError or ValueError)."""

from __future__ import annotations

from collections.abc import Sequence


class OnceError(Exception):
    """Base class of every exception fastapi_once raises for a failed or impossible attempt."""


class OnceCycleError(OnceError, RuntimeError):
    """A once's function awaited its own value, directly or through other onces.

    Waiting would deadlock, so the call that closes the cycle raises this instead.
    """

    def __init__(self, cycle: Sequence[str], action: str | None = None) -> None:
        self.cycle = tuple(cycle)
        self.action = action
        chain = " -> ".join(self.cycle)
        if action is None:
            what = f"{self.cycle[-1]} is awaited while it is being made"
            fix = "break the cycle so that no once depends on itself"
        else:
            what = f"{action} waits for {self.cycle[-1]} to finish, from inside its own work"
            fix = f"call {action} outside the once's function (e.g. in a route or the lifespan)"
        super().__init__(f"once cycle: {chain}: {what}, which would wait forever; {fix}")


class OnceCancelledError(OnceError):
    """The shared attempt was cancelled (its function raised a cancellation, or its loop closed).

    The attempt is not cached: the next call starts a new one.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"the attempt to make {name} was cancelled; the next call tries again")


class OnceClosedError(OnceError, RuntimeError):
    """A once was called in an event loop whose teardown (``once_lifespan`` shutdown) has begun.

    A value made then would outlive the cleanup that promised to close everything.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"{name} cannot be made: the app's once_lifespan has shut down in this event loop, so "
            "its value would never be cleaned up; finish requests before shutdown, or start the "
            "lifespan again"
        )


class OnceTimeoutError(OnceError, TimeoutError):
    """An attempt took longer than the once's ``timeout=``; it was cancelled and not cached."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        super().__init__(
            f"{name} did not finish within its timeout of {timeout:g} s; the attempt was "
            "cancelled and the next call tries again"
        )


# --- raised by the cross-process backends (fastapi_once.backends re-exports them) ---------------


class WaitTimeoutError(OnceError, TimeoutError):
    """A follower waited longer than the backend's ``wait_timeout`` for the leader.

    Attributes:
        name: the once's name.
        backend: the backend's ``describe()``.
        waited: seconds waited.
        holder: who holds the lock (e.g. ``"pid 1234 on web-1"``), or None if unknown.
    """

    def __init__(self, name: str, backend: str, waited: float, holder: str | None) -> None:
        self.name = name
        self.backend = backend
        self.waited = waited
        self.holder = holder
        by = f"held by {holder}" if holder else "held by another process"
        super().__init__(
            f"waited {waited:.1f}s for {name} on {backend}: the lock is {by}, still running it; "
            "raise wait_timeout=, or check that process"
        )


class BackendError(OnceError):
    """A backend's store failed (unreachable, connection lost, server error).

    The driver's exception is the ``__cause__``; the message never includes credentials.
    """


class LeaseLostError(OnceError):
    """The leader lost its lock while its work ran, so its result was not recorded.

    Raised when the lock's lease could not be renewed or was found taken (Redis), or the session
    holding the lock ended (PostgreSQL): another process may already be running the work. The
    work is cancelled; a ``def`` running in a thread cannot be interrupted, so its thread is
    abandoned and whatever it returns later is dropped.
    """

    def __init__(self, name: str, backend: str, why: str) -> None:
        self.name = name
        self.backend = backend
        super().__init__(
            f"{name} lost its lock on {backend} while running ({why}); its result was not "
            "recorded and another process may run it. Make the work idempotent or check "
            "fastapi_once.backends.fencing_token() before each write"
        )


class OnceCoolingDownError(OnceError):
    """A keyed value's last run failed in another process and its ``cooldown=`` still lasts.

    The process that ran it raised the failure itself; the others fail fast with this (the
    failure's text stays in that process: it could hold secrets) until the cooldown ends.

    Attributes:
        name: the once's name and the key's digest, ``name[#1a2b3c4d]``.
        seconds_left: how long the cooldown lasts from when it was read.
    """

    def __init__(self, name: str, seconds_left: float) -> None:
        self.name = name
        self.seconds_left = seconds_left
        super().__init__(
            f"{name} failed in another process and is cooling down for {seconds_left:.1f} s "
            "more (cooldown=); calls fail fast until then, and the next call after that tries "
            "again. That process's log has the error"
        )
