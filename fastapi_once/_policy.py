"""The failure and freshness policy of a once: timeout, retries, cooldown, ttl, refresh."""

from __future__ import annotations

import dataclasses
import logging
import math
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
    """Validated timing options; every one is off (None or 0) unless given."""

    timeout: float | None = None
    retries: int = 0
    backoff: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    cooldown: float | None = None
    ttl: float | None = None
    refresh: float | None = None
    jitter: float | None = None
    log_keys: bool = False  # not timing, but fixed per once and read where attempts start

    @classmethod
    def from_options(cls, name: str, options: dict[str, Any]) -> Policy:
        """Check the timing options of ``once(name, **options)``; raise at the mistake.

        Raises:
            TypeError: an option has the wrong type.
            ValueError: an option is out of range, or refresh is not below ttl.
        """
        for option in ("timeout", "cooldown", "ttl", "refresh"):
            _positive_seconds(name, option, options.get(option))
        _positive_seconds(name, "backoff", options.get("backoff"), zero_ok=True)
        retries = options.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(
                f"once({name}, retries={retries!r}): retries must be a whole number >= 0, the "
                "number of extra tries within one attempt"
            )
        retry_on = options.get("retry_on", (Exception,))
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not (
            isinstance(retry_on, tuple)
            and retry_on
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on)
        ):
            raise TypeError(
                f"once({name}, retry_on={retry_on!r}): retry_on takes an exception class or a "
                "tuple of them, e.g. retry_on=(ConnectionError, TimeoutError)"
            )
        if ("backoff" in options or "retry_on" in options) and not retries:
            raise TypeError(f"once({name}): backoff= and retry_on= apply only with retries=")
        ttl, refresh = options.get("ttl"), options.get("refresh")
        _positive_seconds(name, "jitter", options.get("jitter"))
        if options.get("jitter") is not None and ttl is None and refresh is None:
            raise TypeError(f"once({name}, jitter=...): jitter= applies only with ttl= or refresh=")
        if refresh is not None and ttl is not None and refresh >= ttl:
            raise ValueError(
                f"once({name}, ttl={ttl!r}, refresh={refresh!r}): refresh must be shorter than "
                "ttl, so the value is refreshed before it expires"
            )
        return cls(
            timeout=options.get("timeout"),
            retries=retries,
            backoff=options.get("backoff", 0.1),
            retry_on=retry_on,
            cooldown=options.get("cooldown"),
            jitter=options.get("jitter"),
            ttl=ttl,
            refresh=refresh,
            log_keys=options.get("log_keys", False),
        )

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


def _positive_seconds(name: str, option: str, value: object, zero_ok: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"once({name}, {option}={value!r}): {option} takes seconds as a number")
    if not math.isfinite(value):
        raise ValueError(
            f"once({name}, {option}={value!r}): {option} must be a finite number of seconds; "
            f"leave {option} out to turn it off"
        )
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(
            f"once({name}, {option}={value!r}): {option} must be a positive number of seconds"
        )
