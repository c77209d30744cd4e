"""Call budgets: how many Python-level calls the core makes on its paths, against fixed budgets.

Speed depends on the machine and its load; the number of Python functions a path calls does
not. Each scenario runs in a fresh interpreter (no SDK installed by another test, no loop state
left over) under ``sys.setprofile``, on asyncio, counting every Python-level call except the
event loop's own (the ``asyncio`` package, its selector, the weak set of its tasks) and the
scenario script's. A path that grows past its
budget fails here on any machine; the bench (``python -m bench.floors``) keeps the timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Python-level calls per path (see each test). Lower them when a change makes a path leaner.
BUDGETS = {
    "warm_hit": 1,
    "keyed_hit": 1,
    "keyed_miss": 14,
    "waiter": 3,
    "failed_attempt": 55,
}

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, logging, os, sys

    from fastapi_once import once

    logging.getLogger("fastapi_once").addHandler(logging.NullHandler())
    logging.getLogger("fastapi_once").propagate = False
    # The event loop's own code: asyncio, its selector, the weak set of its tasks.
    LIB = os.path.dirname(os.__file__) + os.sep
    SKIP = (os.path.dirname(asyncio.__file__), LIB + "selectors.py", LIB + "_weakrefset.py")

    class Counter:
        def __init__(self):
            self.calls = self.lookups = 0

        def __call__(self, frame, event, arg):
            if event == "call":
                where = frame.f_code.co_filename
                if not where.startswith(SKIP) and where != "<string>":
                    self.calls += 1
                    if frame.f_code.co_name == "get_tracer_provider" or where == "<frozen os>":
                        self.lookups += 1

    async def counted(make):
        counter = Counter()
        sys.setprofile(counter)
        try:
            await make()
        except RuntimeError:
            pass
        finally:
            sys.setprofile(None)
        LOOKUPS.append(counter.lookups)
        return counter.calls

    LOOKUPS = []

    async def value():
        return 1

    async def keyed_value(k):
        return k

    async def failing():
        raise RuntimeError("no")

    async def waited(gate):
        await gate.wait()
        return 1

    async def crowd(n):
        gate = asyncio.Event()

        async def fn():
            await gate.wait()
            return 1

        target = once(fn)

        async def run():
            callers = [asyncio.ensure_future(target()) for _ in range(n)]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(*callers)

        await run()  # a first crowd: what runs once per process is not counted
        await target.reset()
        return await counted(run)

    async def main():
        counts = {}
        hit = once(value)
        await hit()
        await hit()
        counts["warm_hit"] = await counted(hit)
        keyed = once(keyed_value, key=lambda k: k, maxsize=8)
        for k in range(10):
            await keyed(k)
        counts["keyed_hit"] = await counted(lambda: keyed(9))
        await keyed(100)
        counts["keyed_miss"] = await counted(lambda: keyed(101))
        counts["waiter"] = (await crowd(21) - await crowd(1)) / 20
        fails = once(failing)
        for _ in range(2):
            try:
                await fails()
            except RuntimeError:
                pass
        counts["failed_attempt"] = await counted(fails)
        counts["lookups"] = sum(LOOKUPS)
        print(json.dumps(counts))

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def counts() -> dict[str, float]:
    """The calls of every scenario, counted in one fresh interpreter."""
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr
    found: dict[str, float] = json.loads(run.stdout)
    return found


def test_a_warm_hit_stays_within_its_call_budget(counts: dict[str, float]) -> None:
    """``await o()`` of a made unkeyed value: the once's ``__call__`` and nothing else."""
    assert counts["warm_hit"] <= BUDGETS["warm_hit"], counts


def test_a_keyed_hit_stays_within_its_call_budget(counts: dict[str, float]) -> None:
    """``await o(k)`` of a made key: ``__call__`` (the key function is the caller's)."""
    assert counts["keyed_hit"] <= BUDGETS["keyed_hit"], counts


def test_a_keyed_miss_stays_within_its_call_budget(counts: dict[str, float]) -> None:
    """``await o(k)`` of a new key in a full cache: start, run, settle, wake, evict."""
    assert counts["keyed_miss"] <= BUDGETS["keyed_miss"], counts


def test_a_waiters_join_and_wake_up_stay_within_their_call_budget(
    counts: dict[str, float],
) -> None:
    """One more caller of a cold once, per caller: joining the attempt and waking with it."""
    assert counts["waiter"] <= BUDGETS["waiter"], counts


def test_a_failed_attempt_stays_within_its_call_budget(counts: dict[str, float]) -> None:
    """``await o()`` whose function raises (logged at WARNING to a handler that drops it)."""
    assert counts["failed_attempt"] <= BUDGETS["failed_attempt"], counts


def test_no_path_reads_the_environment_or_looks_up_the_tracer_provider(
    counts: dict[str, float],
) -> None:
    """With the OpenTelemetry API and no SDK, no counted path calls ``get_tracer_provider()``
    or reads ``os.environ``: the tracer is obtained once (the API's proxies bind later)."""
    assert counts["lookups"] == 0, counts
