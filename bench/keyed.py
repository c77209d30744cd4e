"""Scenario 6: the CPU cost of one call of a keyed once, a miss and a hit, against async-lru's.

A miss asks for a key never asked before, in a cache that is full, so it makes a value and evicts
one; a hit asks again for a key the cache holds. Both caches wrap the same ``async def``, each
contender its own copy, and are called as ``await f(k)`` one call after another in one event
loop. The process's CPU time over ``calls`` calls, divided by ``calls``, is one measurement; the
contenders take turns, in a rotated order, over many rounds. Calling the function itself (no
cache) is the floor: the loop, the call and the ``await`` that every contender pays too.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import statistics
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from async_lru import alru_cache

from fastapi_once import once

from .config import Config
from .paired import ratios, spread

Fn = Callable[[int], Coroutine[Any, Any, int]]


def _fn() -> Fn:
    async def fn(k: int) -> int:
        return k

    return fn


def bare(maxsize: int) -> Fn:
    """The function itself, no cache."""
    return _fn()


def keyed_once(maxsize: int) -> Fn:
    """``once(fn, key=lambda k: k, maxsize=maxsize)``."""
    made: Fn = once(_fn(), key=lambda k: k, maxsize=maxsize)
    return made


def alru(maxsize: int) -> Fn:
    """async-lru's ``alru_cache(maxsize=maxsize)(fn)``."""
    return alru_cache(maxsize=maxsize)(_fn())


# id -> (label, what a call does, cache factory), in table order.
CONTENDERS: dict[str, tuple[str, str, Callable[[int], Fn]]] = {
    "bare": ("await fn(k), no cache (floor)", "call", bare),
    "once_miss": ("keyed once, miss", "miss", keyed_once),
    "alru_miss": ("async-lru alru_cache, miss", "miss", alru),
    "once_hit": ("keyed once, hit", "hit", keyed_once),
    "alru_hit": ("async-lru alru_cache, hit", "hit", alru),
}
PAIRS = {"miss": ("once_miss", "alru_miss"), "hit": ("once_hit", "alru_hit")}


async def _calls(get: Fn, keys: list[int]) -> float:
    start = time.process_time()
    for k in keys:
        await get(k)
    return time.process_time() - start


async def _measure(config: Config) -> dict[str, list[float]]:
    maxsize, calls = config.keyed_maxsize, config.keyed_calls
    made = {cid: factory(maxsize) for cid, (_, _, factory) in CONTENDERS.items()}
    fresh: Iterator[int] = itertools.count()  # every miss's key, never asked before
    held = list(range(maxsize))
    hits = [held[i % maxsize] for i in range(calls)]

    def keys(cid: str) -> list[int]:
        if CONTENDERS[cid][1] == "miss":
            return list(itertools.islice(fresh, calls))
        return hits

    for cid, get in made.items():
        # Fill every cache: then a hit finds its key and a miss evicts one. Check the values.
        for k in held if CONTENDERS[cid][1] != "miss" else itertools.islice(fresh, maxsize):
            await get(k)
        await _calls(get, keys(cid))  # warm-up
        if await get(7) != 7:
            raise RuntimeError(f"{cid}: wrong value")
    seconds: dict[str, list[float]] = {cid: [] for cid in CONTENDERS}
    order = list(CONTENDERS)
    for round_ in range(config.keyed_rounds):
        shift = round_ % len(order)
        for cid in order[shift:] + order[:shift]:
            these = keys(cid)
            gc.collect()
            seconds[cid].append(await _calls(made[cid], these))
    return seconds


def run(config: Config) -> dict[str, Any]:
    """CPU nanoseconds per call of each contender; keyed once over async-lru, miss and hit."""
    seconds = asyncio.run(_measure(config))
    ns = {cid: [s / config.keyed_calls * 1e9 for s in values] for cid, values in seconds.items()}
    contenders = {
        cid: {
            "label": label,
            "kind": kind,
            "ns_per_call": statistics.median(ns[cid]),
            "ns_spread": spread(ns[cid]),
            "ns_rounds": ns[cid],
        }
        for cid, (label, kind, _) in CONTENDERS.items()
    }
    return {
        "rounds": config.keyed_rounds,
        "calls_per_round": config.keyed_calls,
        "maxsize": config.keyed_maxsize,
        "contenders": contenders,
        "once_over_alru": {
            kind: ratios(ns[ours], ns[theirs]) for kind, (ours, theirs) in PAIRS.items()
        },
    }
