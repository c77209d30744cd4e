"""Scenarios 2 and 3: many concurrent callers at cold start, when ``fn`` succeeds and when it fails.

Each contender is a function that wraps ``fn`` (an ``async def`` with no parameters) the way its
library or recipe would, and returns what a caller awaits. Every trial runs in a fresh event loop
with freshly wrapped functions, as in a freshly started process. The cold burst also runs a bare
``asyncio.Event``, the least a single flight can do: its drain is the floor for everyone's.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from async_lru import alru_cache
from fastapi_singleton import singleton

from fastapi_once import once

from .config import Config
from .paired import ratios, spread

Fn = Callable[[], Coroutine[Any, Any, object]]


def lock_recipe(fn: Fn) -> Fn:
    """The naive recipe: a module-level ``asyncio.Lock`` around a check of a global."""
    lock = asyncio.Lock()
    value: object = None

    async def get() -> object:
        nonlocal value
        async with lock:
            if value is None:
                value = await fn()
        return value

    return get


def fastapi_singleton(fn: Fn) -> Fn:
    """``@singleton`` from fastapi-singleton."""
    made: Fn = singleton(fn)
    return made


def alru_cache_recipe(fn: Fn) -> Fn:
    """``@alru_cache`` from async-lru."""
    return alru_cache(maxsize=1)(fn)


def once_(fn: Fn) -> Fn:
    """``once(fn)``."""
    return once(fn)


def bare_event(fn: Fn) -> Fn:
    """The floor: the first caller starts ``fn`` in a task; every caller awaits one Event.

    No error handling, no cancellation, no reset: it serves the cold burst only.
    """
    done = asyncio.Event()
    work: asyncio.Task[None] | None = None
    value: object = None

    async def make() -> None:
        nonlocal value
        value = await fn()
        done.set()

    async def get() -> object:
        nonlocal work
        if work is None:
            work = asyncio.create_task(make())
        await done.wait()
        return value

    return get


# The failure burst's contenders; the cold burst runs these and the bare Event.
CONTENDERS: dict[str, tuple[str, Callable[[Fn], Fn]]] = {
    "lock_recipe": ("asyncio.Lock recipe", lock_recipe),
    "fastapi_singleton": ("fastapi-singleton", fastapi_singleton),
    "alru_cache": ("async-lru", alru_cache_recipe),
    "once": ("once", once_),
}
COLD_CONTENDERS: dict[str, tuple[str, Callable[[Fn], Fn]]] = {
    "event": ("bare asyncio.Event (floor)", bare_event),
    **CONTENDERS,
}

VALUE = object()


async def _spin(stop: asyncio.Event) -> None:
    # Busy on purpose: one step of this task on every turn of the event loop.
    while not stop.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0)


async def cold_trial(
    wrap: Callable[[Fn], Fn], callers: int, busy: int, sleep_s: float
) -> dict[str, float]:
    runs = 0
    returned_at = 0.0

    async def fn() -> object:
        nonlocal runs, returned_at
        runs += 1
        await asyncio.sleep(sleep_s)
        returned_at = time.perf_counter()
        return VALUE

    get = wrap(fn)
    resumed: list[float] = []

    async def caller() -> None:
        value = await get()
        resumed.append(time.perf_counter())
        assert value is VALUE

    stop = asyncio.Event()
    spinners = [asyncio.create_task(_spin(stop)) for _ in range(busy)]
    await asyncio.sleep(0)
    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    stop.set()
    await asyncio.gather(*spinners)
    last = max(resumed)
    return {"runs": runs, "total_s": last - start, "drain_s": last - returned_at}


async def failure_trial(
    wrap: Callable[[Fn], Fn], callers: int, fail_after_s: float
) -> dict[str, float]:
    attempts: list[float] = []

    async def fn() -> object:
        started = time.perf_counter()
        await asyncio.sleep(fail_after_s)
        attempts.append(time.perf_counter() - started)
        raise RuntimeError("the value cannot be made")

    get = wrap(fn)
    failed: list[float] = []

    async def caller() -> None:
        try:
            await get()
        except RuntimeError:
            failed.append(time.perf_counter())
        else:
            raise AssertionError("fn cannot succeed")

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    last_error_s = max(failed) - start
    return {
        "attempts": len(attempts),
        "attempt_s": attempts[0],
        "last_error_s": last_error_s,
        "last_error_over_attempt": last_error_s / attempts[0],
        "errors": len(failed),
    }


def _trial(coro_fn: Callable[[], Coroutine[Any, Any, dict[str, float]]]) -> dict[str, float]:
    gc.collect()
    return asyncio.run(coro_fn())


def _medians(trials: list[dict[str, float]]) -> dict[str, Any]:
    summary: dict[str, Any] = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
    summary["trials"] = trials
    return summary


def _rotated(round_: int, contenders: dict[str, Any]) -> list[str]:
    order = list(contenders)
    shift = round_ % len(order)
    return order[shift:] + order[:shift]


def run_cold(config: Config) -> dict[str, Any]:
    """Cold burst: ``callers`` concurrent first calls, idle and busy loop; runs, total, drain."""
    trials: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    modes = {"idle": 0, "busy": config.busy_tasks}
    for round_ in range(config.burst_rounds):
        for n in config.burst_sizes:
            for mode, busy in modes.items():
                for cid in _rotated(round_, COLD_CONTENDERS):
                    wrap = COLD_CONTENDERS[cid][1]
                    result = _trial(
                        lambda: cold_trial(wrap, n, busy, config.burst_sleep_s)  # noqa: B023
                    )
                    trials.setdefault((cid, mode, n), []).append(result)
    contenders: dict[str, Any] = {}
    for cid, (label, _) in COLD_CONTENDERS.items():
        contenders[cid] = {"label": label}
        for mode in modes:
            contenders[cid][mode] = {
                str(n): _medians(trials[(cid, mode, n)]) for n in config.burst_sizes
            }
            for n in config.burst_sizes:
                # Drain over the bare Event's drain in the same round, and its spread.
                drains = [t["drain_s"] for t in trials[(cid, mode, n)]]
                floor = [t["drain_s"] for t in trials[("event", mode, n)]]
                contenders[cid][mode][str(n)]["drain_over_event"] = ratios(drains, floor)
                contenders[cid][mode][str(n)]["drain_spread"] = spread(drains)
    return {
        "fn_sleep_s": config.burst_sleep_s,
        "busy_tasks": config.busy_tasks,
        "callers": list(config.burst_sizes),
        "rounds": config.burst_rounds,
        "contenders": contenders,
    }


def run_failure(config: Config) -> dict[str, Any]:
    """Failure burst: concurrent callers of an ``fn`` that fails; attempts and last error time."""
    trials: dict[str, list[dict[str, float]]] = {cid: [] for cid in CONTENDERS}
    for round_ in range(config.failure_rounds):
        for cid in _rotated(round_, CONTENDERS):
            wrap = CONTENDERS[cid][1]
            result = _trial(
                lambda: failure_trial(wrap, config.failure_callers, config.failure_after_s)  # noqa: B023
            )
            trials[cid].append(result)
    return {
        "callers": config.failure_callers,
        "fn_fails_after_s": config.failure_after_s,
        "rounds": config.failure_rounds,
        "contenders": {
            cid: {
                "label": CONTENDERS[cid][0],
                **_medians(trials[cid]),
                "last_error_over_attempt_spread": spread(
                    [t["last_error_over_attempt"] for t in trials[cid]]
                ),
            }
            for cid in CONTENDERS
        },
    }
