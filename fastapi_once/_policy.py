"""The failure and freshness policy of a once: timeout, retries, cooldown, ttl, refresh, stale."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._errors import OnceCoolingDownError, OnceTimeoutError
from ._telemetry import error_type, fields

logger = logging.getLogger("fastapi_once")

MAX_BACKOFF = 30.0


@dataclasses.dataclass(frozen=True)
class Policy:
    """Timing options (checked by ``_options``); every one is off (None or 0) unless given."""

    timeout: float | None = None
    retries: int = 0
    backoff: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    cooldown: float | None = None
    ttl: float | None = None
    refresh: float | None = None
    jitter: float | None = None
    stale_if_error: float | None = None  # seconds past ttl a value is kept for failed refreshes
    log_keys: bool = False  # not timing, but fixed per once and read where attempts start

    def deadlines(self, made_at: float) -> tuple[float | None, float | None]:
        """When a value made at ``made_at`` is due for refresh, and when it expires.

        With ``jitter``, one uniform draw in [0, jitter) per value is added to both, so values
        made together do not expire together (and refresh stays before expiry).
        """
        if self.jitter is not None:
            made_at += random.uniform(0, self.jitter)
        refresh_at = None if self.refresh is None else made_at + self.refresh
        expires_at = None if self.ttl is None else made_at + self.ttl
        return refresh_at, expires_at

    def retires(self, expires_at: float | None) -> float | None:
        """When a value that expires at ``expires_at`` is retired: its ttl plus stale_if_error."""
        if expires_at is None or self.stale_if_error is None:
            return expires_at
        return expires_at + self.stale_if_error

    def cooldown_until(self, now: float, error: BaseException) -> float | None:
        """Until when calls fail fast with ``error`` (or a failed refresh waits), if at all.

        Only ordinary failures cool down; a cancellation or ``KeyboardInterrupt`` does not. A
        failure another process recorded for a keyed value cools down until its cooldown ends.
        """
        if self.cooldown is None or not isinstance(error, Exception):
            return None
        if isinstance(error, OnceCoolingDownError):  # another process's cooldown: its end
            return now + min(self.cooldown, error.seconds_left)
        return now + self.cooldown

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based): exponential, jittered."""
        # Past 64 doublings the ceiling is MAX_BACKOFF anyway; capping the exponent keeps
        # any retries= clear of float overflow.
        ceiling = min(MAX_BACKOFF, self.backoff * 2 ** min(retry - 1, 64))
        return random.uniform(ceiling / 2, ceiling)

    def timed_out(self, label: str) -> OnceTimeoutError:
        """The error that waiters get when an attempt outlives ``timeout``."""
        assert self.timeout is not None
        return OnceTimeoutError(label, self.timeout)

    async def run(self, label: object, make: Callable[[], Awaitable[Any]]) -> Any:
        """Call ``make`` with this policy's retries (``timeout`` is the caller's to enforce).

        Raises:
            Exception: the last try's exception when every try failed.
        """
        if not self.retries:
            return await make()
        cancelled = anyio.get_cancelled_exc_class()
        retry = 0
        while True:
            try:
                return await make()
            except self.retry_on as exc:
                if retry >= self.retries or isinstance(exc, cancelled):
                    raise
                retry += 1
                delay = self.delay(retry)
                logger.warning(
                    "%s: try %d of %d failed with %s; retrying in %.2f s",
                    label,
                    retry,
                    self.retries + 1,
                    type(exc).__name__,
                    delay,
                    extra=fields(
                        str(getattr(label, "name", label)),
                        "retry",
                        duration_s=None,
                        error_type=error_type(exc),
                        attempt=getattr(label, "number", None),
                    ),
                )
                await anyio.sleep(delay)
