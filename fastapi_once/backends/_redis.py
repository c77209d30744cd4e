"""RedisBackend: a leased lock key per once, renewed while the work runs, with fencing tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import anyio

from .._errors import BackendError, LeaseLostError, OnceCoolingDownError, WaitTimeoutError
from ._base import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_WAIT_TIMEOUT,
    Backend,
    Scrubber,
    backoff,
    check_size,
    forget_reset,
    holder_id,
    max_bytes,
    reset_message,
    run_guarded,
    seconds,
    time_left,
)
from ._codec import encode_json
from ._wakeups import Listeners, Wakeups

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RedisBackend needs the redis package: pip install 'fastapi-once[redis]'"
    ) from exc

# KEYS: done, lock, fence. ARGV: lock value, lease (ms).
# Returns {1, result} when done, {2, fencing token} when the lock is now ours, {0, lock value}.
# The token is the counter's next value, floored at the server's clock in microseconds: after a
# restart that lost the counter it still exceeds every token drawn before (the clock moved on).
_ACQUIRE = """
local done = redis.call('GET', KEYS[1])
if done then return {1, done} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[3])
  local now = redis.call('TIME')
  local floor = now[1] .. string.rep('0', 6 - #now[2]) .. now[2]
  if fence < tonumber(floor) then
    redis.call('SET', KEYS[3], floor)
    return {2, floor}
  end
  return {2, fence}
end
return {0, redis.call('GET', KEYS[2]) or ''}
"""

# KEYS: lock. ARGV: lock value, lease (ms). Extends the lease only if the lock is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock. ARGV: lock value. Deletes the lock only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock, done. ARGV: lock value, result, marker ttl (ms, or '' for none).
# Records the result and releases the lock in one step, only if the lock is still ours.
_COMPLETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
redis.call('DEL', KEYS[1])
return 1
"""


# --- keyed records: KEYS value, lock, fence, cool of one key; the value is "<made ms> <json>" ----

# KEYS: value, lock, cool. ARGV: lock value, lease (ms), refresh age (ms, or '').
# Returns {1, record} to serve, {2, fencing token, record or ''} when the lock is
# now ours (a record given: its refresh is ours), {3, ms left} while a failure cools down, or
# {0, lock value} to wait. A record due for refresh is served while another process refreshes it.
# The fencing token is the server's clock in microseconds: a key's next leader takes the lock
# after this one lost or freed it, so later (no counter key per client-supplied key).
_KEYED_ACQUIRE = """
local record = redis.call('GET', KEYS[1])
local now = redis.call('TIME')
if record then
  if ARGV[3] == '' or redis.call('PTTL', KEYS[3]) > 0 then return {1, record} end
  local made = tonumber(string.sub(record, 1, string.find(record, ' ') - 1))
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if ms - made < tonumber(ARGV[3]) then return {1, record} end
else
  local cool = redis.call('PTTL', KEYS[3])
  if cool > 0 then return {3, cool} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, now[1] .. string.rep('0', 6 - #now[2]) .. now[2], record or ''}
end
if record then return {1, record} end
return {0, redis.call('GET', KEYS[2]) or ''}
"""

# KEYS: lock, value, cool. ARGV: lock value, result, ttl (ms), channel.
# Records the result stamped with the server's time, frees the lock and wakes the waiters, only
# if the lock is still ours.
_KEYED_COMPLETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local now = redis.call('TIME')
local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
redis.call('SET', KEYS[2], ms .. ' ' .. ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('PUBLISH', ARGV[4], 'done')
return 1
"""

# KEYS: lock, cool. ARGV: lock value, cooldown (ms, or ''), channel.
# After a failure: records the cooldown (not the error), frees the lock and wakes the waiters,
# only if the lock is still ours.
_KEYED_FAIL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], 'failed')
return 1
"""


class _Client:
    """One event loop's Redis client and its scripts (redis.asyncio clients are loop-bound)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry replaces a connection that a server restart broke; longer
            # outages are handled by the backend, which knows the lease and wait_timeout.
            retry=Retry(NoBackoff(), 1),
        )
        self.acquire: AsyncScript = self.redis.register_script(_ACQUIRE)
        self.renew: AsyncScript = self.redis.register_script(_RENEW)
        self.release: AsyncScript = self.redis.register_script(_RELEASE)
        self.complete: AsyncScript = self.redis.register_script(_COMPLETE)
        self.keyed_acquire: AsyncScript = self.redis.register_script(_KEYED_ACQUIRE)
        self.keyed_complete: AsyncScript = self.redis.register_script(_KEYED_COMPLETE)
        self.keyed_fail: AsyncScript = self.redis.register_script(_KEYED_FAIL)


class RedisBackend(Backend):
    """Run a once's work once across every process (and host) that uses one Redis server.

    The fast path reads the marker key. Otherwise a script atomically re-checks the marker and
    tries ``SET lock value NX PX lease``; the winner draws a fencing token (see
    :func:`~fastapi_once.backends.fencing_token`) and runs the work as leader while a background
    task renews the lease every ``lease / 3`` seconds. On success a script records the result and
    deletes the lock in one step, only if the lock is still the leader's. Followers retry the
    script every ``poll_interval`` seconds, so they see the result (or take over from a failed
    leader) within that interval; a leader that died is replaced once its lease expires.

    If renewal finds the lock gone or taken (or Redis unreachable for a whole lease), the work is
    cancelled at once and :class:`~fastapi_once.backends.LeaseLostError` is raised; nothing is
    recorded. A follower that loses Redis (a restart, a failover) reconnects with backoff and
    keeps waiting, up to ``wait_timeout``; Redis unreachable at the first contact fails at once
    with :class:`~fastapi_once.backends.BackendError`.

    Keys: ``<namespace>:{<name>}:done`` (the result), ``:lock`` and ``:fence``, where ``<name>``
    has ``%``, ``{`` and ``}`` percent-encoded, so that no two (namespace, name) pairs share a
    key and one once's keys share a cluster slot.

    A keyed once (``once(fn, key=..., ttl=..., across=backend)``) keeps one record per key under
    ``<namespace>:k:{<name>:<digest>}:v`` (``:lock``, ``:cool``), where ``<digest>`` is the
    key's 40-digit digest, never its text. Every one of them expires: the value after ``ttl``,
    the lock after its lease, a failure's cooldown after ``cooldown``. A keyed leader's fencing
    token is the server's clock in microseconds when it took the lock. The leader announces
    its end on the pub/sub channel ``...:ev``; followers hold no connection while they wait:
    one pub/sub connection per process and event loop (``PSUBSCRIBE <namespace>:k:{*}:ev``,
    also subscribed to keyed resets) wakes them, and they check again every
    ``recheck_interval`` seconds (a leader that died announces nothing).

    Limits: asyncio only (redis.asyncio). The lock is efficiency-grade, not a correctness
    guarantee: a leader paused longer than its lease (GC, swap, a stopped VM) or a Redis failover
    or restart without persistence lets a second leader start while the first still runs. The
    first one's result is then refused, but its side effects happen; make the work idempotent,
    or pass :func:`~fastapi_once.backends.fencing_token` to the stores it writes to.

    Args:
        url: a Redis URL (``redis://:password@host:6379/0``, ``rediss://`` for TLS); its password
            never appears in errors, logs or :meth:`describe`.
        namespace: the prefix of every key (no braces).
        lease: seconds the lock lives without renewal: how long a dead leader blocks the others.
        wait_timeout: the longest a follower waits for the leader, in seconds (default
            300 s), outages included; None waits as long as the leader runs.
        ttl: the default life of a marker in seconds (``run_once(ttl=)`` overrides it); None
            keeps markers until :meth:`reset`.
        poll_interval: how often a follower checks, in seconds (default 0.025).
        max_value_bytes: the largest result recorded, in bytes of JSON (default 1 MiB); a
            leader whose result is larger raises ValueError and records nothing. None: no
            limit.
        recheck_interval: how often a follower of a keyed once checks without being woken, in
            seconds (default 1): how late it learns of a leader that died.

    Raises:
        ValueError: ``namespace`` is empty or has braces, or a time is not a positive number.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "fastapi_once",
        lease: float = 10.0,
        wait_timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        ttl: float | None = None,
        poll_interval: float = 0.025,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        recheck_interval: float = 1.0,
    ) -> None:
        if not isinstance(namespace, str) or not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(
                f"RedisBackend(namespace={namespace!r}): give a non-empty string without braces"
            )
        self._url = url
        self._scrub = Scrubber(url)
        self.namespace = namespace
        self.lease: float = seconds("lease", lease)
        self.wait_timeout = seconds("wait_timeout", wait_timeout)
        self.ttl = seconds("ttl", ttl)
        self.poll_interval: float = seconds("poll_interval", poll_interval)
        self.max_value_bytes = max_bytes(max_value_bytes)
        self.recheck_interval: float = seconds("recheck_interval", recheck_interval)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Client] = (
            weakref.WeakKeyDictionary()
        )
        # Per event loop, the task that listens for keyed notifications and other processes'
        # keyed resets, and the followers it wakes; it ends with its loop (or aclose).
        self._listeners = Listeners(self._listen)
        self._me = secrets.token_hex(8)  # tells this backend's own reset messages apart

    def describe(self) -> str:
        """Return ``RedisBackend(<url with the password masked>, namespace=...)``."""
        return f"RedisBackend({self._scrub.shown}, namespace={self.namespace})"

    async def aclose(self) -> None:
        """Close the running event loop's connections (they reopen on next use; keyed followers
        waiting meanwhile go on waiting, on the loop's next listener)."""
        # The client leaves first: a follower that the listener's end wakes (and that starts
        # the next listener) uses a new one.
        client = self._clients.pop(asyncio.get_running_loop(), None)
        await self._listeners.stop()
        if client is not None:
            await client.redis.aclose()

    async def reset(self, name: str) -> None:
        """Delete ``name``'s marker, so that the next :meth:`run_once` runs the work.

        Args:
            name: the once's name (``once(...).name``).

        Raises:
            BackendError: Redis could not be reached or refused the command.
        """
        try:
            await self._client().redis.delete(self._keys(name).done)
        except RedisError as exc:
            raise self._error("deleting the marker", exc) from exc

    async def run_once(
        self,
        name: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
    ) -> Any:
        """Return ``name``'s recorded result, running ``work`` first if no process has.

        While ``work`` runs as leader, :func:`~fastapi_once.backends.fencing_token` returns the
        lock's fencing token.

        Args:
            name: the once's name, its identity across processes.
            work: makes the result (runs in this process only if it becomes the leader).
            ttl: seconds the marker stays valid; default the backend's ``ttl``.

        Raises:
            TypeError: the result is not JSON-serialisable (nothing is recorded).
            WaitTimeoutError: a follower waited longer than ``wait_timeout``.
            LeaseLostError: the lease was lost while ``work`` ran (nothing is recorded).
            BackendError: Redis could not be reached or refused a command.
            RuntimeError: not running on asyncio.
            Exception: what ``work`` raised, in the process that ran it.
        """
        ttl = self.ttl if ttl is None else seconds("ttl", ttl)
        started = time.monotonic()
        client = self._client()
        keys = self._keys(name)
        try:
            found = await client.redis.get(keys.done)
        except RedisError as exc:
            raise self._error("reading the marker", exc) from exc
        if found is not None:
            return json.loads(found)
        lock = _Lock(json.dumps({"token": secrets.token_hex(16), "holder": holder_id()}))
        found = await self._acquire(client, name, keys, lock, started)
        if found is not None:
            return json.loads(found)
        try:
            value = await self._run_renewing(client, name, keys.lock, lock, work)
            text = encode_json(name, value, self.describe())
            check_size(name, text, self.max_value_bytes, self.describe())
            await self._record(client, name, keys, lock, text, ttl)
        except BaseException:
            await self._release(client, keys, lock)
            raise
        return json.loads(text)

    async def _acquire(
        self, client: _Client, name: str, keys: _Keys, lock: _Lock, started: float
    ) -> str | None:
        """Return the recorded result, or None as leader (``lock`` then holds the token).

        Redis going away while waiting (a restart) is ridden out with backoff until
        ``wait_timeout``.
        """
        lease_ms = _ms(self.lease)
        failures = 0
        holder: str | None = None
        while True:
            sent = time.monotonic()
            try:
                status, data = await client.acquire(
                    keys=[keys.done, keys.lock, keys.fence], args=[lock.value, lease_ms]
                )
            except (RedisConnectionError, RedisTimeoutError) as exc:
                waited = time.monotonic() - started
                left = time_left(self.wait_timeout, waited)
                if left <= 0:
                    raise self._error(f"waiting for {name} (unreachable)", exc) from exc
                await anyio.sleep(min(backoff(failures), left))
                failures += 1
                continue
            except RedisError as exc:
                raise self._error(f"waiting for {name}", exc) from exc
            failures = 0
            if status == 1:
                return str(data)
            if status == 2:
                lock.fence, lock.renewed_at = int(data), sent
                return None
            holder = _holder(str(data))
            waited = time.monotonic() - started
            if self.wait_timeout is not None and waited >= self.wait_timeout:
                raise WaitTimeoutError(name, self.describe(), waited, holder)
            await anyio.sleep(self.poll_interval)

    async def _run_renewing(
        self,
        client: _Client,
        name: str,
        lock_key: str,
        lock: _Lock,
        work: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run ``work`` while renewing the lease; cancel it and raise if the lease is lost."""
        return await run_guarded(
            name,
            self.describe(),
            lock.fence,
            work,
            lambda: self._renew_until_lost(client, lock_key, lock),
        )

    async def _renew_until_lost(self, client: _Client, lock_key: str, lock: _Lock) -> str:
        """Renew the lease every lease/3 seconds; return why it was lost (never, if cancelled)."""
        while True:
            await anyio.sleep(self.lease / 3)
            sent = time.monotonic()
            try:
                ok = await client.renew(keys=[lock_key], args=[lock.value, _ms(self.lease)])
            except RedisError as exc:
                # The lease runs from when its last renewal was sent.
                if time.monotonic() - lock.renewed_at < self.lease:
                    continue
                return self._scrub(f"Redis unreachable for a whole lease of {self.lease:g}s: {exc}")
            if not ok:
                return "the lock expired or another process took it"
            lock.renewed_at = sent

    async def _record(
        self, client: _Client, name: str, keys: _Keys, lock: _Lock, text: str, ttl: float | None
    ) -> None:
        """Record the result and free the lock in one step, if the lock is still ours."""
        ttl_ms = "" if ttl is None else _ms(ttl)
        try:
            done = await client.complete(
                keys=[keys.lock, keys.done], args=[lock.value, text, ttl_ms]
            )
        except RedisError as exc:
            raise self._error(f"recording the result of {name}", exc) from exc
        if not done:
            raise LeaseLostError(
                name, self.describe(), "the lock expired or another process took it"
            )

    async def _release(self, client: _Client, keys: _Keys, lock: _Lock) -> None:
        """Free the lock if it is still ours; if Redis cannot be told, the lease expires."""
        # Shielded: a cancelled leader still frees the lock.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self.lease),
            contextlib.suppress(RedisError),
        ):
            await client.release(keys=[keys.lock], args=[lock.value])

    # --- keyed records -----------------------------------------------------------------------

    async def run_keyed(
        self,
        name: str,
        key: str,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float,
        cooldown: float | None = None,
        refresh: float | None = None,
    ) -> Any:
        """Return ``name``'s recorded result for ``key``, running ``work`` first if due.

        One script call serves a recorded value (or says a failure cools down, or takes the
        lock). As leader, ``work`` runs under the renewed lease; its result is recorded for
        ``ttl`` seconds and the followers, waiting on the key's channel, are woken.

        Args: as :meth:`Backend.run_keyed`.

        Raises:
            OnceCoolingDownError: another process's run failed within ``cooldown``.
            ValueError: the result is larger than ``max_value_bytes`` (nothing is recorded).
            TypeError: the result is not JSON-serialisable (nothing is recorded).
            WaitTimeoutError: a follower waited longer than ``wait_timeout``.
            LeaseLostError: the lease was lost while ``work`` ran (nothing is recorded).
            BackendError: Redis could not be reached or refused a command.
            Exception: what ``work`` raised, in the process that ran it.
        """
        ttl = seconds("ttl", ttl)
        shown = f"{name}[#{key[:8]}]"  # as logs name the key
        started = time.monotonic()
        client = self._client()
        wakeups = self._listeners.start()
        keys = self._keyed_keys(name, key)
        lock = _Lock(json.dumps({"token": secrets.token_hex(16), "holder": holder_id()}))
        found = await self._keyed_acquire(client, wakeups, shown, keys, lock, refresh, started)
        if found is not None:
            return json.loads(found.partition(" ")[2])
        client = self._client()  # a new one if aclose() closed the loop's meanwhile
        try:
            value = await self._run_renewing(client, shown, keys.lock, lock, work)
            text = encode_json(shown, value, self.describe())
            check_size(shown, text, self.max_value_bytes, self.describe())
            try:
                done = await client.keyed_complete(
                    keys=[keys.lock, keys.value, keys.cool],
                    args=[lock.value, text, _ms(ttl), keys.channel],
                )
            except RedisError as exc:
                raise self._error(f"recording the result of {shown}", exc) from exc
        except (BackendError, LeaseLostError):
            await self._keyed_release(client, keys, lock, None)  # not the work's failure
            raise
        except Exception:
            await self._keyed_release(client, keys, lock, cooldown)  # the work failed
            raise
        except BaseException:
            await self._keyed_release(client, keys, lock, None)
            raise
        if not done:
            raise LeaseLostError(
                shown, self.describe(), "the lock expired or another process took it"
            )
        return json.loads(text)

    async def _keyed_acquire(
        self,
        client: _Client,
        wakeups: Wakeups,
        name: str,
        keys: _KeyedKeys,
        lock: _Lock,
        refresh: float | None,
        started: float,
    ) -> str | None:
        """Return the record to serve, or None as leader (``lock`` then holds the token).

        At most 8 checks of one loop run at once (each on a pooled connection
        for the call only), so followers woken together share a few connections. A follower
        registers with this loop's listener (see :meth:`_listen`), checks again once the
        listener is subscribed (the leader may have ended before), and waits to be
        woken or for ``recheck_interval``, holding no connection meanwhile. Redis going away
        while waiting is ridden out with backoff until ``wait_timeout``.
        """
        refresh_ms: int | str = "" if refresh is None else _ms(refresh)
        args: list[int | str] = [lock.value, _ms(self.lease), refresh_ms]
        failures = 0
        reached = False  # unreachable at the first contact: fail at once, as run_once does
        with contextlib.ExitStack() as stack:
            woken: asyncio.Event | None = None
            while True:
                if wakeups.ended:  # aclose() stopped the listener: wait on the loop's next one
                    stack.close()
                    woken, wakeups, client = None, self._listeners.start(), self._client()
                sent = time.monotonic()
                if woken is not None:
                    woken.clear()  # before the check: a wake-up after it is kept
                try:
                    async with wakeups.gate:
                        try:
                            status, data, *_ = await client.keyed_acquire(
                                keys=[keys.value, keys.lock, keys.cool], args=args
                            )
                        except anyio.get_cancelled_exc_class():
                            # The script may have run and taken the lock for us: free it now
                            # (only if it is ours), rather than after the lease.
                            await self._keyed_release(client, keys, lock, None)
                            raise
                    reached = True
                    if status == 1:
                        return str(data)
                    if status == 2:
                        lock.fence, lock.renewed_at = int(data), sent
                        return None
                    if status == 3:
                        raise OnceCoolingDownError(name, int(data) / 1000)
                    waited = time.monotonic() - started
                    if self.wait_timeout is not None and waited >= self.wait_timeout:
                        raise WaitTimeoutError(name, self.describe(), waited, _holder(str(data)))
                    left = time_left(self.wait_timeout, waited)
                    if woken is None:
                        woken = stack.enter_context(wakeups.waiter(keys.channel))
                        # Check again once the listener hears the channel: the leader may
                        # have ended before.
                        await wakeups.until_listening(min(self.recheck_interval, left))
                        continue
                    await Wakeups.woken(woken, min(self.recheck_interval, left))
                    failures = 0
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    left = time_left(self.wait_timeout, time.monotonic() - started)
                    if not reached:
                        raise self._error(f"reading the record of {name}", exc) from exc
                    if left <= 0:
                        raise self._error(f"waiting for {name} (unreachable)", exc) from exc
                    await anyio.sleep(min(backoff(failures), left))
                    failures += 1
                except RedisError as exc:
                    raise self._error(f"waiting for {name}", exc) from exc

    async def _keyed_release(
        self, client: _Client, keys: _KeyedKeys, lock: _Lock, cooldown: float | None
    ) -> None:
        """Free the lock if it is still ours, recording ``cooldown`` if given; wake waiters."""
        cool = "" if cooldown is None else _ms(cooldown)
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self.lease),
            contextlib.suppress(RedisError),
        ):
            await client.keyed_fail(
                keys=[keys.lock, keys.cool], args=[lock.value, cool, keys.channel]
            )

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Delete ``name``'s record for ``key`` (a digest), or every key's record if None.

        A failure's cooldown is deleted with the value; a leader at work keeps its lock.

        Raises:
            BackendError: Redis could not be reached or refused the command.
        """
        client = self._client()
        try:
            await self._reset_keyed(client, name, key)
            # Processes that hold the key (or keys) forget it: see _listen.
            await client.redis.publish(self._resets, reset_message(name, key, self._me))
        except RedisError as exc:
            raise self._error("deleting keyed records", exc) from exc

    async def _reset_keyed(self, client: _Client, name: str, key: str | None) -> None:
        if key is not None:
            keys = self._keyed_keys(name, key)
            await client.redis.delete(keys.value, keys.cool)
        else:
            # Every key's digest has 40 characters: a longer name that starts with this one
            # cannot match.
            prefix = self._keyed_prefix(name)
            pattern = _glob_escape(prefix) + "?" * 40 + "}:*"
            doomed: list[str] = []
            async for found in client.redis.scan_iter(match=pattern, count=1000):
                if found.endswith((":v", ":cool")):
                    doomed.append(found)
                if len(doomed) >= 500:
                    await self._unlink(client, doomed)
            await self._unlink(client, doomed)

    @property
    def _resets(self) -> str:
        return f"{self.namespace}:k:resets"  # the channel of keyed resets

    async def _listen(self, wakeups: Wakeups) -> None:
        """Until cancelled, on one pub/sub connection: forget keys other processes reset, and
        wake this loop's followers of a keyed record when its leader announces its end.

        After an outage it subscribes again, with backoff, and then wakes every follower to
        check again (what was announced meanwhile was missed).
        """
        pattern = _glob_escape(f"{self.namespace}:k:{{") + "*}:ev"
        failures = 0
        while True:
            pubsub = self._client().redis.pubsub()
            try:
                await pubsub.subscribe(self._resets)
                await pubsub.psubscribe(pattern)
                while True:
                    message = await pubsub.get_message(timeout=_IDLE_PING)
                    if message is None:
                        await pubsub.ping()  # a silent connection may be a dead one
                        continue
                    kind = message["type"]
                    if kind == "pmessage":
                        wakeups.wake(str(message["channel"]))
                    elif kind == "message":
                        forget_reset(str(message["data"]), self._me, self._forget)
                    elif kind == "psubscribe":
                        # The server answers in order: both subscriptions hold from here.
                        failures = 0
                        wakeups.listening.set()
                        wakeups.wake_all()
            except RedisError:
                pass  # Redis went away: subscribe again, after a backoff
            finally:
                wakeups.listening.clear()
                await _close_quietly(pubsub)
            await anyio.sleep(backoff(failures, cap=5.0))
            failures += 1

    async def _unlink(self, client: _Client, doomed: list[str]) -> None:
        # One key per command: a keyed record's keys are in their own cluster slot.
        if doomed:
            async with client.redis.pipeline(transaction=False) as pipe:
                for found in doomed:
                    pipe.unlink(found)
                await pipe.execute()
            doomed.clear()

    def _keyed_prefix(self, name: str) -> str:
        tag = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return f"{self.namespace}:k:{{{tag}:"

    def _keyed_keys(self, name: str, key: str) -> _KeyedKeys:
        # The hash tag is the name and the key's digest: one key's records share a cluster
        # slot, and different keys spread over the slots.
        prefix = f"{self._keyed_prefix(name)}{key}}}:"
        return _KeyedKeys(prefix + "v", prefix + "lock", prefix + "cool", prefix + "ev")

    def _client(self) -> _Client:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{self.describe()} runs on asyncio only (redis.asyncio); run the app on asyncio "
                "or use FileLockBackend"
            ) from None
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = _Client(self._url, min(self.lease / 2, 5.0))
        return client

    def _keys(self, name: str) -> _Keys:
        # Percent-encoding keeps the name's braces out of the hash tag, and makes the mapping
        # from (namespace, name) to keys one-to-one (the namespace has no braces).
        tag = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        prefix = f"{self.namespace}:{{{tag}}}:"
        return _Keys(prefix + "done", prefix + "lock", prefix + "fence")

    def _error(self, doing: str, exc: BaseException) -> BackendError:
        detail = self._scrub(f"{type(exc).__name__}: {exc}")
        return BackendError(f"{self.describe()}: failed {doing}: {detail}")


class _Keys(NamedTuple):
    done: str
    lock: str
    fence: str


class _KeyedKeys(NamedTuple):
    value: str
    lock: str
    cool: str
    channel: str


async def _close_quietly(pubsub: Any) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()


def _glob_escape(text: str) -> str:
    """``text`` as a Redis glob pattern that matches only itself."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)


class _Lock:
    """The leader's hold on a once's lock key."""

    def __init__(self, value: str) -> None:
        self.value = value  # the lock key's value: a random token and who holds it
        self.fence = 0  # the fencing token drawn with the lock
        self.renewed_at = 0.0  # monotonic time the last successful (re)acquire was sent


_IDLE_PING = 5.0  # seconds the listener hears nothing before it pings its connection


def _ms(duration: float) -> int:
    return max(1, round(duration * 1000))


def _holder(lock_value: str) -> str | None:
    try:
        holder = json.loads(lock_value)["holder"]
    except (ValueError, KeyError, TypeError):
        return None
    return holder if isinstance(holder, str) else None
