"""``python -m bench.floors``: the core's floors, each ratio measured side by side in one run.

Every round measures, in a rotated order, each pair of a ratio in the same round:

- drain: 10,000 waiters of a cold call on a busy loop (100 spinning tasks), released when the
  value is made: ``once`` over a bare ``asyncio.Event`` (each in a fresh loop);
- failure burst: 200 callers of an ``fn`` that fails after 20 ms: the last caller's error over
  the attempt's own duration (one fresh loop per trial; the pair is within the trial);
- keyed miss and hit: CPU time per ``await f(k)`` of a keyed once over async-lru's, plus a keyed
  once with its telemetry hooks switched off (``_telemetry.OTEL = False``, "compiled out") to
  show that an OpenTelemetry API without an SDK costs nothing;
- hot path: a FastAPI route with a made ``Depends(once(fn))`` (and one whose once has a sync
  sub-dependency) over a plain ``async def`` dependency, requests/s and CPU, in-process ASGI.
  With ``--processes N`` (default 8) these pairs run in N child processes one after another,
  each with its own ``PYTHONHASHSEED``, and their rounds are pooled: where a process's hash
  seed places names in CPython's method cache moves a request's cost by about 1% (more than
  this floor's margin), differently for each app, so one process's ratio is one draw of that
  luck and the pool is the figure a fleet of processes sees.

It prints the table of medians, quartiles and ranges (and the load average before and after)
and writes ``floors.json`` and ``floors.md`` beside the other results.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi_once import _telemetry

from . import burst, hot_path, keyed
from .paired import ratios, spread

HOT = ("baseline", "once", "once_subdep")
KEYED = {
    "once_miss": ("miss", keyed.keyed_once),
    "once_miss_off": ("miss", keyed.keyed_once),  # the same, telemetry hooks off
    "alru_miss": ("miss", keyed.alru),
    "once_hit": ("hit", keyed.keyed_once),
    "alru_hit": ("hit", keyed.alru),
}


def _rotated(round_: int, items: list[str]) -> list[str]:
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


class _Steady:
    """The parts that keep state across rounds (filled caches, served apps), in one loop."""

    def __init__(self, maxsize: int, calls: int, requests: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.maxsize, self.calls, self.requests = maxsize, calls, requests
        self.fresh = itertools.count()
        self.hits = [i % maxsize for i in range(calls)]
        self.caches: dict[str, Any] = {}
        self.served: dict[str, Any] = {}
        self.run(self._setup())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    async def _setup(self) -> None:
        for cid, (kind, factory) in KEYED.items():
            get = self.caches[cid] = factory(self.maxsize)
            keys = range(self.maxsize) if kind == "hit" else itertools.islice(self.fresh, 5000)
            for k in keys:
                await get(k)
        for cid in HOT:
            app = hot_path.CONTENDERS[cid][1]()
            served = self.served[cid] = hot_path.Served(app, {})
            await served.check()
            await served.serve(self.requests)

    async def keyed_round(self, cid: str) -> float:
        kind = KEYED[cid][0]
        keys = list(itertools.islice(self.fresh, self.calls)) if kind == "miss" else self.hits
        get, off = self.caches[cid], cid.endswith("_off")
        saved = _telemetry.OTEL
        _telemetry.OTEL = saved and not off
        try:
            start = time.process_time()
            for k in keys:
                await get(k)
            took = time.process_time() - start
        finally:
            _telemetry.OTEL = saved
        return took / len(keys) * 1e9

    async def hot_round(self, cid: str) -> tuple[float, float]:
        wall, cpu = await self.served[cid].serve(self.requests)
        return self.requests / wall, self.requests / max(cpu, 1e-9)


def _drain(wrap: Callable[[Any], Any], n: int, busy: int) -> float:
    gc.collect()
    return asyncio.run(burst.cold_trial(wrap, n, busy, 0.05))["drain_s"]


def _failure(callers: int) -> float:
    gc.collect()
    trial = asyncio.run(burst.failure_trial(burst.once_, callers, 0.02))
    assert trial["attempts"] == 1, trial
    return trial["last_error_over_attempt"]


def _hot_rounds(steady: _Steady, round_: int, rps: dict[str, list[float]], cpu: Any) -> None:
    for _ in range(4):  # the hot path's ratio is the finest: more pairs per round
        for cid in _rotated(round_, list(HOT)):
            wall, cpus = steady.run(steady.hot_round(cid))
            rps[cid].append(wall)
            cpu[cid].append(cpus)


def hot_child(rounds: int, smoke: bool) -> dict[str, dict[str, list[float]]]:
    """The hot path's rounds alone, in this process (a child of :func:`measure`)."""
    steady = _Steady(10, 10, 30 if smoke else 300)
    rps: dict[str, list[float]] = {cid: [] for cid in HOT}
    cpu: dict[str, list[float]] = {cid: [] for cid in HOT}
    for round_ in range(rounds):
        gc.collect()
        _hot_rounds(steady, round_, rps, cpu)
    steady.loop.close()
    return {"rps": rps, "cpu": cpu}


def _hot_in_children(rounds: int, smoke: bool, processes: int) -> list[dict[str, Any]]:
    runs = []
    for seed in range(processes):  # one after another: each has the machine to itself
        command = [sys.executable, "-m", "bench.floors", "--hot-child", "--rounds", str(rounds)]
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        out = subprocess.run(
            command + (["--smoke"] if smoke else []),
            env=env,
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout
        runs.append(json.loads(out))
    return runs


def measure(rounds: int, smoke: bool, processes: int = 1) -> dict[str, Any]:
    """Measure every ratio over ``rounds`` rotated rounds; return the raw series and spreads.

    With ``processes`` above 1 the hot path's rounds run in that many child processes, each
    with its own hash seed, and are pooled (see the module's docstring).
    """
    n, busy, callers = (200, 10, 20) if smoke else (10_000, 100, 200)
    steady = _Steady(50 if smoke else 1_000, 100 if smoke else 2_000, 30 if smoke else 300)
    drains: dict[str, list[float]] = {"event": [], "once": []}
    fail: list[float] = []
    ns: dict[str, list[float]] = {cid: [] for cid in KEYED}
    rps: dict[str, list[float]] = {cid: [] for cid in HOT}
    cpu: dict[str, list[float]] = {cid: [] for cid in HOT}
    wraps = {"event": burst.bare_event, "once": burst.once_}
    for round_ in range(rounds):
        for cid in _rotated(round_, list(drains)):
            drains[cid].append(_drain(wraps[cid], n, busy))
        fail.append(_failure(callers))
        gc.collect()
        for cid in _rotated(round_, list(KEYED)):
            ns[cid].append(steady.run(steady.keyed_round(cid)))
        if processes <= 1:
            _hot_rounds(steady, round_, rps, cpu)
    steady.loop.close()
    per_process: list[float] = []
    if processes > 1:
        for run in _hot_in_children(rounds, smoke, processes):
            for cid in HOT:
                rps[cid] += run["rps"][cid]
                cpu[cid] += run["cpu"][cid]
            per_process.append(ratios(run["rps"]["once"], run["rps"]["baseline"])["median"])
    return {
        "drain_over_event": ratios(drains["once"], drains["event"]),
        "drain_ms": {cid: spread([d * 1e3 for d in v]) for cid, v in drains.items()},
        "failure_last_error_over_attempt": spread(fail),
        "keyed_miss_over_alru": ratios(ns["once_miss"], ns["alru_miss"]),
        "keyed_miss_telemetry_off_over_on": ratios(ns["once_miss_off"], ns["once_miss"]),
        "keyed_hit_over_alru": ratios(ns["once_hit"], ns["alru_hit"]),
        "keyed_ns": {cid: spread(v) for cid, v in ns.items()},
        "hot_once_over_plain": ratios(rps["once"], rps["baseline"]),
        "hot_once_subdep_over_plain": ratios(rps["once_subdep"], rps["baseline"]),
        "hot_cpu_once_over_plain": ratios(cpu["once"], cpu["baseline"]),
        "hot_cpu_once_subdep_over_plain": ratios(cpu["once_subdep"], cpu["baseline"]),
        "hot_rps": {cid: spread(v) for cid, v in rps.items()},
        "hot_processes": processes,
        "hot_once_over_plain_per_process": per_process,
    }


#: The hot path's floor: 0.995 on CPython 3.12 and later, 0.99 on 3.11 and earlier.
HOT_FLOOR = 0.995 if sys.version_info >= (3, 12) else 0.99

# (key, what, floor, whether lower is better)
ROWS = (
    ("drain_over_event", "drain, 10,000 waiters, busy loop / bare asyncio.Event", 1.2, True),
    (
        "failure_last_error_over_attempt",
        "failure burst, 200 callers: last error / attempt",
        1.2,
        True,
    ),
    ("keyed_miss_over_alru", "keyed miss, CPU / async-lru's", 1.0, True),
    ("keyed_hit_over_alru", "keyed hit, CPU / async-lru's", 1.0, True),
    (
        "keyed_miss_telemetry_off_over_on",
        "keyed miss, hooks off / API only (no SDK)",
        None,
        True,
    ),
    ("hot_once_over_plain", "hot path, once / plain async def (req/s)", HOT_FLOOR, False),
    (
        "hot_once_subdep_over_plain",
        "hot path, once + sync sub-dependency / plain",
        HOT_FLOOR,
        False,
    ),
    ("hot_cpu_once_over_plain", "hot path, once / plain (CPU)", HOT_FLOOR, False),
    (
        "hot_cpu_once_subdep_over_plain",
        "hot path, once + sub-dep / plain (CPU)",
        HOT_FLOOR,
        False,
    ),
)


def markdown(results: dict[str, Any]) -> str:
    """The table: each ratio's median, IQR and range, and whether its floor is met."""
    env = results["environment"]
    found = results["ratios"]
    processes = found.get("hot_processes", 1)
    lines = [
        f"CPython {env['python']}, {env['cpus']} CPUs, load average {env['load_before']} before, "
        f"{env['load_after']} after; {results['rounds']} rounds; hot path in {processes} "
        "process(es) of their own hash seed, pooled",
        "",
        "| ratio | median (IQR) | range | floor | met |",
        "|---|---|---|---|---|",
    ]
    for key, what, floor, lower in ROWS:
        s = results["ratios"][key]
        met = "" if floor is None else ("yes" if (s["median"] <= floor) == lower else "no")
        bound = "" if floor is None else f"{'<=' if lower else '>='} {floor}"
        lines.append(
            f"| {what} | {s['median']:.3f} ({s['q1']:.3f}-{s['q3']:.3f}) | "
            f"{s['min']:.3f}-{s['max']:.3f} | {bound} | {met} |"
        )
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    """Run the floors; print the table and write floors.json and floors.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="rotated rounds (default 30)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; numbers meaningless")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where to write floors.json and floors.md (default: bench/results/)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=8,
        help="child processes (hash seeds 0..N-1) for the hot path's rounds (default 8; 1: "
        "in this process, between the other rounds)",
    )
    parser.add_argument("--hot-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("fastapi_once").addHandler(logging.NullHandler())  # no stderr output
    if args.hot_child:
        print(json.dumps(hot_child(2 if args.smoke else args.rounds, args.smoke)))
        return 0
    before = _load()
    found = measure(2 if args.smoke else args.rounds, args.smoke, args.processes)
    results = {
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": before,
            "load_after": _load(),
        },
        "rounds": 2 if args.smoke else args.rounds,
        "ratios": found,
    }
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"floors{sys.version_info[0]}{sys.version_info[1]}"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
