"""RedisBackend: the lease store over Redis: two Lua scripts, pub/sub, a bounded pool per loop.

A record's keys (``_keys``; the layout: docs/across.md): ``v`` holds ``"<made ms> <json>"``,
``lock`` ``"<token> <holder>"``, ``cool`` a cooldown, ``fence`` the counter; ``ev`` its channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import warnings
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import anyio

from .._errors import BackendError
from ._base import PerLoop, Scrubber, backoff, seconds, store_errors, whole
from ._lease import LeaseOptions, StoreBackend
from ._store import UNKEYED, Claim, Cooling, Held, Lease, Reset, Served, Watch
from ._wakeups import Listeners, ListenerWatch, Wakeups

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, NoScriptError, RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RedisBackend needs the redis package: pip install 'fastapi-once[redis]'"
    ) from exc

if TYPE_CHECKING:
    from typing_extensions import Unpack

_OUTAGES = (aioredis.ConnectionError, aioredis.TimeoutError)  # not a refused login
_LISTENER_AND_ONE = " (the listener's connection and one for commands)"
_IDLE_PING = 5.0  # seconds the listener hears nothing before it pings its connection
_LISTENING_WITHIN = 0.5  # the longest a loop's first claim or a watch waits for the listener
_FREE_WITHIN = 0.5  # the longest a cancelled claim spends freeing the lease it may have taken
# A name in a hash tag, percent-encoded (no two names share one, braces stay out); a text as a
# Redis glob pattern that matches only itself.
_TAG = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]^"})
# What follows a name's prefix in the keys of its records' values and cooldowns.
_RECORD = re.compile(rf"({re.escape(UNKEYED)}|[0-9a-f]{{40}})}}:(v|cool)")

# KEYS: v, lock, cool, fence[, 0.2's marker]. ARGV: lock value, lease (ms), refresh age (ms, or '').
# {1, record} to serve; {3, ms left} while a failure cools down; {2, fence} when the lease is now
# ours (the record's counter plus one, never below the server's clock in µs, so it grows across a
# restart that lost the counter; it outlives the lease by 60 s); {0, lock value} while another
# holds it. An unkeyed record that 0.2 made (its marker: the JSON alone) is made at time 0.
CLAIM = """
local record = redis.call('GET', KEYS[1])
if not record and KEYS[5] then
  record = redis.call('GET', KEYS[5])
  if record then record = '0 ' .. record end
end
local now = redis.call('TIME')
if record then
  local age = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(string.match(record, '^%d+'))
  if ARGV[3] == '' or age < tonumber(ARGV[3]) or redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
    return {1, record}
  end
else
  local cool = redis.call('PTTL', KEYS[3])
  if cool > 0 then return {3, cool} end
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {0, redis.call('GET', KEYS[2]) or ''}
end
local floor = tonumber(now[1] .. string.format('%06d', tonumber(now[2])))
local fence = math.max(tonumber(redis.call('GET', KEYS[4]) or '0') + 1, floor)
redis.call('SET', KEYS[4], string.format('%.0f', fence), 'PX', ARGV[2] + 60000)
return {2, fence}
"""

# KEYS: lock, fence, v, cool, channel. ARGV: lock value, then the lease (ms) to renew, the value
# and its ttl (ms, or '') to complete, or '' and the cooldown (ms, or '') to abandon. Only while
# the lease is ours: extends it (and the counter's life), or records the value stamped with the
# server's time (clearing the cooldown) or the cooldown, frees the lease and wakes the watches.
HELD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if #ARGV == 2 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2] + 60000)
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[2] ~= '' then
  local now = redis.call('TIME')
  local made = now[1] .. string.format('%03d ', math.floor(now[2] / 1000))
  redis.call('SET', KEYS[3], made .. ARGV[2])
  if ARGV[3] ~= '' then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
  redis.call('DEL', KEYS[4])
elseif ARGV[3] ~= '' then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', KEYS[5], 'ended')
return 1
"""


_SHA1 = {script: hashlib.sha1(script.encode()).hexdigest() for script in (CLAIM, HELD)}


class RedisBackend(StoreBackend):
    """Share a once's value across every process (and host) that uses one Redis server.

    Asyncio only (redis.asyncio). Waiting followers hold no connection: one pub/sub connection
    per process and event loop wakes them and hears resets. The lease is efficiency-grade: a
    leader paused past its lease, or a restart without persistence, lets a second leader start
    while the first runs; make the work idempotent, or pass ``fencing_token()`` to its stores.

    Args:
        url: a Redis URL (``redis://:password@host:6379/0``, ``rediss://`` for TLS); its
            password never appears in errors, logs or :meth:`describe`.
        namespace: the prefix of every key (no braces).
        lease: seconds a lease lives without renewal: how long a dead leader blocks the others
            (each round trip times out after ``min(lease / 2, 5)`` seconds).
        wait_timeout: the longest a follower waits, and any one call to Redis takes, in seconds
            (default 300); None: no bound.
        ttl: the default life of an unkeyed once's value in seconds; None keeps it until reset.
        poll_interval: no longer used (followers are woken by ``PUBLISH``); passing it warns.
        max_value_bytes: the largest value recorded, in bytes of JSON (default 1 MiB; None: any).
        recheck_interval: seconds between a waiting follower's unwoken claims (default 1).
        max_connections: the most connections open to Redis per process and event loop, the
            listener's included (default 10), whatever the number of keys in flight.

    Raises:
        ValueError: ``namespace`` is empty or has braces, the URL's database part is not a
            number, a time is not a positive number, or ``max_connections`` is below 2.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "fastapi_once",
        poll_interval: float | None = None,
        max_connections: int = 10,
        **options: Unpack[LeaseOptions],
    ) -> None:
        super().__init__(**options)
        if poll_interval is not None:
            seconds("poll_interval", poll_interval)
            warnings.warn(
                "RedisBackend(poll_interval=) is no longer used: followers are woken by PUBLISH "
                "and claim again every recheck_interval=; remove it",
                DeprecationWarning,
                stacklevel=2,
            )
        if not isinstance(namespace, str) or not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(
                f"RedisBackend(namespace={namespace!r}): give a non-empty string without braces"
            )
        self._shown = Scrubber(url).shown
        _check_url(url, self._shown)
        self._url = url
        self.namespace = namespace
        self._resets = f"{namespace}:k:resets"  # the channel of every name's resets
        self._timeout = min(self.lease / 2, 5.0)
        self.max_connections = whole(
            "RedisBackend", "max_connections", max_connections, least=2, unit=_LISTENER_AND_ONE
        )
        # Per event loop, its client (and pool); it goes with the loop's listener or aclose().
        self._clients = PerLoop(
            self._client,
            f"{self.describe()} runs on asyncio only (redis.asyncio); run the app on asyncio or "
            "use FileLockBackend",
        )
        # Per event loop, the listener of the leaders' ends and of resets, and the watches.
        self._listeners = Listeners(self._listen)

    def describe(self) -> str:
        """Return ``RedisBackend(<url with the password masked>, namespace=...)``."""
        return f"RedisBackend({self._shown}, namespace={self.namespace})"

    async def claim(
        self, name: str, key: str, *, lease: float, refresh: float | None, holder: str
    ) -> Claim:
        """See :meth:`LeaseStore.claim`: one script."""
        self._clients.get()  # asyncio only: say so before the listener would
        fresh = asyncio.get_running_loop() not in self._listeners
        wakeups = self._listeners.start()
        keys = self._keys(name, key, "v", "lock", "cool", "fence") + self._legacy(name, key)
        mine = f"{secrets.token_hex(16)} {holder}"
        try:
            args = (mine, _ms(lease), _ms(refresh))
            status, data = await self._run(CLAIM, f"claiming {name}", keys, *args)
            if fresh:  # this loop's first claim: resets are heard from its return on
                await wakeups.until_listening(_LISTENING_WITHIN)
        except anyio.get_cancelled_exc_class():
            # The script may have run and taken the lease: free it now (only if it is ours).
            bounded = anyio.CancelScope(shield=True, deadline=anyio.current_time() + _FREE_WITHIN)
            with bounded, contextlib.suppress(BackendError):
                await self.abandon(Lease(name, key, None, mine), cooldown=None)
            raise
        if status == 2:
            return Lease(name, key, int(data), mine)
        if status == 3:
            return Cooling(int(data) / 1000)
        text = str(data).partition(" ")[2]  # a value after its time, a holder after its token
        return Served(text) if status == 1 else Held(text or None)

    async def renew(self, lease: Lease, *, seconds: float) -> bool:
        """See :meth:`LeaseStore.renew`: one script."""
        return await self._held(lease, f"renewing the lease of {lease.name}", _ms(seconds))

    async def complete(self, lease: Lease, value: str, *, ttl: float | None) -> bool:
        """See :meth:`LeaseStore.complete`: one script, which publishes on the record's channel."""
        return await self._held(lease, f"recording the value of {lease.name}", value, _ms(ttl))

    async def abandon(self, lease: Lease, *, cooldown: float | None) -> None:
        """See :meth:`LeaseStore.abandon`: one script, which publishes on the record's channel."""
        await self._held(lease, f"freeing the lease of {lease.name}", "", _ms(cooldown))

    async def _held(self, lease: Lease, doing: str, *args: object) -> bool:
        keys = self._keys(lease.name, lease.key, "lock", "fence", "v", "cool", "ev")
        return bool(await self._run(HELD, doing, keys, lease.handle, *args))

    async def clear(self, name: str, key: str | None, *, origin: str) -> None:
        """Delete the value(s) and cooldown(s), then publish the reset on its channel."""
        redis = self._clients.get()
        doing = f"resetting {name}"
        with store_errors(
            self.describe(), doing, RedisError, outage=_OUTAGES, refused=AuthenticationError
        ):
            if key is not None:
                await redis.unlink(*self._keys(name, key, "v", "cool"), *self._legacy(name, key))
            else:
                prefix = self._prefix(name)
                async for found in redis.scan_iter(match=prefix.translate(_GLOB) + "*", count=1000):
                    # Only this name's records: a longer name starting with it has a ':' here.
                    if _RECORD.fullmatch(found[len(prefix) :]):
                        await redis.unlink(found)  # one key a command: records' slots differ
            await redis.publish(self._resets, Reset(name, key, origin).to_json())

    @contextlib.asynccontextmanager
    async def watch(self, name: str, key: str) -> AsyncIterator[Watch]:
        """Register with this loop's listener for the record's channel (see LeaseStore)."""
        self._clients.get()  # asyncio only: say so before the listener would
        with ListenerWatch(self._listeners, self._channel(name, key)) as watch:
            await watch.wakeups.until_listening(_LISTENING_WITHIN)
            yield watch

    async def aclose(self) -> None:
        """Stop this loop's listener and close its pool (a later call opens new ones)."""
        # The client leaves first: a watch that the listener's end wakes (and that starts the
        # next listener) uses a new one.
        client = self._clients.pop()
        await self._listeners.stop()
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _listen(self, wakeups: Wakeups) -> None:
        """Until cancelled, on one pub/sub connection: wake the watches of a record whose leader
        ended, and hand every reset to ``heard``. After an outage it subscribes again, with
        backoff, and wakes every watch (what was published meanwhile was missed)."""
        failures = 0
        client = self._clients.get()  # the loop's: only aclose() replaces it, and stops this
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(self._resets)
                    await pubsub.psubscribe(f"{self.namespace}:k:{{".translate(_GLOB) + "*}:ev")
                    while True:
                        message = await pubsub.get_message(timeout=_IDLE_PING)
                        if message is None:
                            await pubsub.ping()  # a silent connection may be a dead one
                        elif message["type"] == "pmessage":
                            wakeups.wake(str(message["channel"]))
                        elif message["type"] == "message":
                            wakeups.announced(str(message["data"]), self._channel, self.heard)
                        elif message["type"] == "psubscribe":
                            # The server answers in order: both subscriptions hold from here.
                            failures = 0
                            wakeups.listening.set()
                            wakeups.wake_all()
                except RedisError:
                    pass  # Redis went away: subscribe again, after a backoff
                finally:
                    wakeups.listening.clear()
                    with anyio.CancelScope(shield=True), contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()
                await anyio.sleep(backoff(failures, cap=5.0))
                failures += 1
        finally:
            # The listener ends with its loop (or aclose): the loop's client goes with it, so
            # that nothing kept here holds a closed loop (a client made since stays).
            if self._clients.pop(client) is not None:
                bounded = anyio.CancelScope(shield=True, deadline=anyio.current_time() + 1)
                with bounded, contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    def _client(self) -> Any:
        """A new client for the running loop, on its own pool."""
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=self.max_connections,
            timeout=self.wait_timeout,  # for a free connection: not an outage
            decode_responses=True,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # One immediate retry replaces a connection that a server restart broke;
            # longer outages are the algorithm's, which knows the lease and wait_timeout.
            retry=Retry(NoBackoff(), 1),
        )
        return aioredis.Redis.from_pool(pool)

    async def _run(self, script: str, doing: str, keys: list[str], *args: object) -> Any:
        """Run one of the scripts above on the running loop's client (sending it if need be)."""
        redis = self._clients.get()
        with store_errors(
            self.describe(), doing, RedisError, outage=_OUTAGES, refused=AuthenticationError
        ):
            try:  # the server keeps scripts by their SHA1, made once (see _SHA1)
                return await redis.evalsha(_SHA1[script], len(keys), *keys, *args)
            except NoScriptError:  # a server that has not seen it yet, or has restarted
                await redis.script_load(script)
                return await redis.evalsha(_SHA1[script], len(keys), *keys, *args)

    def _prefix(self, name: str) -> str:
        return f"{self.namespace}:k:{{{name.translate(_TAG)}:"

    def _keys(self, name: str, key: str, *parts: str) -> list[str]:
        """The record's keys (or channel) named by ``parts`` (``v``, ``lock``...), under one hash
        tag of the name and key: they share a cluster slot, and records spread over the slots."""
        return [f"{self._prefix(name)}{key}}}:{part}" for part in parts]

    def _channel(self, name: str, key: str) -> str:
        return self._keys(name, key, "ev")[0]

    def _legacy(self, name: str, key: str) -> list[str]:
        """Where 0.2 kept an unkeyed once's value (read, never written: see CLAIM), as a list."""
        return [f"{self.namespace}:{{{name.translate(_TAG)}}}:done"] if key == UNKEYED else []


def _check_url(url: str, shown: str) -> None:
    """Refuse a URL whose database part is not a number (the driver would use db 0)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return  # the driver says what is wrong with it at first use
    db = unquote(parts.path).strip("/")
    if parts.scheme in ("redis", "rediss") and db and not db.isdigit():
        raise ValueError(
            f"RedisBackend({shown}): the database part of the URL, {db!r}, is not a number; "
            "give a database index, e.g. redis://host:6379/0"
        )


def _ms(duration: float | None) -> int | str:
    """Milliseconds (at least 1) for a script's argument; None: ``''``."""
    return "" if duration is None else max(1, round(duration * 1000))
