"""``python -m bench.outage``: a keyed ``across=`` app under steady load while Redis goes away.

One private redis-server and one counting upstream (``bench.upstream``) on 127.0.0.1. Per
contender, ``--workers`` uvicorn processes (4) serve ``bench.fleet_app``'s route with
``once(get_stuff, key=..., ttl=1, across="redis://...", on_backend_error=...)``: ``"raise"``
(the 0.2 behaviour: a call that cannot reach the store fails with ``BackendError``) and
``"local"`` (the default for keyed onces: the value is made with the process's own
single-flight). Both fleets run side by side, against the same Redis and through the same
outage. Per mode, an open-loop load sends ``--rate`` requests a second to each fleet (request
``i`` to worker ``i % workers`` for URL ``i % urls``) for ``--seconds`` (15); in the middle Redis
is gone for ``--outage`` seconds (5):

- ``stall``: the server is stopped with SIGSTOP and resumed with SIGCONT (connections stay open
  and unanswered: each round trip runs into its timeout);
- ``restart``: the server is killed and started again on the same port with the same data
  directory (no persistence: its keys are lost; connections are refused until it is back).

Per contender and mode: requests sent and failed, by HTTP status (or ``timeout`` after
``--request-timeout`` s, or ``connection error``), in the outage window (requests sent between
the stop and the moment Redis answers again) and overall; p50/p99 latency of the requests sent in
and out of the window (failed ones included); the upstream fetches. Every loop is bounded: the
load ends after ``--seconds``, each request after ``--request-timeout``, and at most
``--max-in-flight`` requests per fleet are outstanding (beyond that a request is counted as not
sent). Prints a table and writes ``bench/results/outage.{json,md}``. Needs the ``bench`` and
``test`` groups and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import report
from .fleet import Worker, upstream, workers
from .upstream import counts, get

ROOT = Path(__file__).resolve().parent.parent
# The servers of the backend tests: one implementation of both.
sys.path.insert(0, str(ROOT / "tests" / "backends"))

from backend_servers import RedisServer, start_redis  # noqa: E402

POLICIES = ("raise", "local")
MODES = ("stall", "restart")
OK = "200"


def _target(path: str) -> str:
    return f"/stuff?url={quote(path, safe='')}"


async def _request(port: int, path: str, timeout: float) -> str:
    """The outcome of one request: its HTTP status, ``timeout`` or ``connection error``."""
    try:
        status, _ = await asyncio.wait_for(get(port, _target(path)), timeout)
    except TimeoutError:
        return "timeout"
    except (OSError, asyncio.IncompleteReadError):  # refused, reset, or cut off mid-response
        return "connection error"
    return str(status)


async def _warm(fleet: list[Worker], prefix: str, timeout: float) -> None:
    """One request per worker, for a URL of its own: every worker answers before the load."""
    for w, worker in enumerate(fleet):
        outcome = await _request(worker.port, f"{prefix}warm/{w}", timeout)
        if outcome != OK:
            raise RuntimeError(f"worker {worker.port} answered {outcome}; see {worker.log}")


async def _outage(server: RedisServer, mode: str, seconds: float) -> tuple[float, float]:
    """Take Redis away for ``seconds`` as ``mode`` says; when it went and when it answered again."""
    assert server.proc is not None
    if mode == "stall":
        pid = server.proc.pid
        began = time.perf_counter()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return began, time.perf_counter()
    began = time.perf_counter()
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - began)))
    await asyncio.to_thread(server.start)  # returns once it listens again, same port and dir
    return began, time.perf_counter()


async def _load(
    fleets: dict[str, list[Worker]],
    prefixes: dict[str, str],
    server: RedisServer,
    mode: str,
    args: argparse.Namespace,
) -> tuple[dict[str, list[tuple[float, float, str]]], dict[str, int], float, float]:
    """Drive every fleet at ``--rate`` requests a second through one outage.

    Returns, per fleet, (sent at, seconds, outcome) of each request and the requests not sent
    (the in-flight bound was reached); and the outage's start and end, relative to the start.
    """
    done: dict[str, list[tuple[float, float, str]]] = {name: [] for name in fleets}
    not_sent = dict.fromkeys(fleets, 0)
    in_flight = dict.fromkeys(fleets, 0)  # one event loop: no lock

    async def one(name: str, port: int, path: str, sent: float) -> None:
        try:
            outcome = await _request(port, path, args.request_timeout)
            done[name].append((sent, time.perf_counter() - start - sent, outcome))
        finally:
            in_flight[name] -= 1

    start = time.perf_counter()
    outage_at = (args.seconds - args.outage) / 2
    total = round(args.seconds * args.rate)
    async with asyncio.TaskGroup() as tasks:

        async def take_away() -> tuple[float, float]:
            await asyncio.sleep(outage_at)
            return await _outage(server, mode, args.outage)

        window = tasks.create_task(take_away())
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i / args.rate - time.perf_counter()))
            sent = time.perf_counter() - start
            for name, fleet in fleets.items():
                if in_flight[name] >= args.max_in_flight:
                    not_sent[name] += 1
                    continue
                in_flight[name] += 1
                path = f"{prefixes[name]}item/{i % args.urls}"
                tasks.create_task(one(name, fleet[i % len(fleet)].port, path, sent))
    began, ended = window.result()
    return done, not_sent, began - start, ended - start


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _part(requests: list[tuple[float, float, str]]) -> dict[str, Any]:
    """Sent, failed (by outcome) and p50/p99 (ms) of some requests."""
    outcomes = Counter(outcome for _, _, outcome in requests)
    ms = [seconds * 1000 for _, seconds, _ in requests]
    return {
        "sent": len(requests),
        "failed": len(requests) - outcomes[OK],
        "failed_by_status": {k: v for k, v in sorted(outcomes.items()) if k != OK},
        "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": _percentile(ms, 0.99),
    }


def one_mode(
    mode: str,
    fleets: dict[str, list[Worker]],
    server: RedisServer,
    upstream_port: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One load through one outage of ``mode``; per fleet, what it measured."""
    tag = secrets.token_hex(3)
    prefixes = {name: f"/{mode}-{tag}/{name}/" for name in fleets}
    done, not_sent, began, ended = asyncio.run(_load(fleets, prefixes, server, mode, args))
    results: dict[str, Any] = {"outage_from_s": began, "outage_to_s": ended, "contenders": {}}
    for name in fleets:
        inside = [r for r in done[name] if began <= r[0] <= ended]
        outside = [r for r in done[name] if not began <= r[0] <= ended]
        fetched = asyncio.run(counts(upstream_port, f"{prefixes[name]}item/"))
        results["contenders"][name] = {
            "overall": _part(done[name]),
            "window": _part(inside),
            "outside": _part(outside),
            "not_sent": not_sent[name],
            "upstream_fetches": sum(fetched.values()),
        }
    return results


@contextlib.contextmanager
def _fleets(
    base: dict[str, Any], args: argparse.Namespace, directory: Path
) -> Iterator[dict[str, list[Worker]]]:
    """One fleet per policy, each warmed up; yield them by policy."""
    managers = {
        policy: workers(
            args.workers,
            {
                **base,
                "contender": "once_redis",
                "on_backend_error": policy,
                "name": f"bench.outage.{policy}",
            },
            directory,
        )
        for policy in POLICIES
    }
    with contextlib.ExitStack() as stack:
        # The fleets start at the same time; each one that started is stopped on the way out,
        # even when the other failed to.
        with ThreadPoolExecutor(len(managers)) as pool:
            starting = {policy: pool.submit(m.__enter__) for policy, m in managers.items()}
        for policy, future in starting.items():
            if future.exception() is None:
                stack.push(managers[policy].__exit__)
        fleets = {policy: future.result() for policy, future in starting.items()}
        for policy, fleet in fleets.items():
            asyncio.run(_warm(fleet, f"/warm/{policy}/", args.request_timeout))
        yield fleets


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Start Redis, the upstream and the fleets; run each mode; the results."""
    server = start_redis()
    try:
        with upstream(args.delay, directory) as port:
            base: dict[str, Any] = {"ttl": args.ttl, "upstream": port, "redis": server.url}
            with _fleets(base, args, directory) as fleets:
                load_before = os.getloadavg()
                modes: dict[str, Any] = {}
                for mode in args.modes or MODES:
                    print(f"[bench.outage] {mode} ...", file=sys.stderr, flush=True)
                    modes[mode] = one_mode(mode, fleets, server, port, args)
                load_after = os.getloadavg()
    finally:
        server.stop()
    return {
        "workers_per_contender": args.workers,
        "rate_per_contender": args.rate,
        "seconds": args.seconds,
        "outage_s": args.outage,
        "urls": args.urls,
        "ttl_s": args.ttl,
        "fetch_delay_s": args.delay,
        "request_timeout_s": args.request_timeout,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "modes": modes,
    }


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} ms"


def _failed(part: dict[str, Any]) -> str:
    by = ", ".join(f"{k}: {v}" for k, v in part["failed_by_status"].items())
    return f"{part['failed']} of {part['sent']}" + (f" ({by})" if by else "")


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: one table per mode."""
    before, after = results["load_average_before"], results["load_average_after"]
    lines = [
        f'`once(get_stuff, key=..., ttl={results["ttl_s"]:g}, across="redis://...")` over '
        f"{results['urls']} URLs, {results['workers_per_contender']} uvicorn workers per "
        f"contender, {results['rate_per_contender']:g} requests/s to each contender for "
        f"{results['seconds']:g} s, Redis gone for {results['outage_s']:g} s in the middle; "
        f"upstream fetches take {results['fetch_delay_s'] * 1000:.0f} ms. "
        f"{results['cpus']} CPUs, load average (1/5/15 min) "
        f"{before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f} before, "
        f"{after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f} after.",
    ]
    for mode, measured in results["modes"].items():
        window = measured["outage_to_s"] - measured["outage_from_s"]
        lines += [
            "",
            f"**{mode}** (Redis away from {measured['outage_from_s']:.1f} s to "
            f"{measured['outage_to_s']:.1f} s: a {window:.1f} s window)",
            "",
            "| on_backend_error | failed in the window | failed overall | p50 / p99 in the "
            "window | p50 / p99 outside | upstream fetches |",
            "|---|---|---|---|---|---|",
        ]
        for policy, c in measured["contenders"].items():
            w, o = c["window"], c["outside"]
            not_sent = f"; {c['not_sent']} not sent" if c["not_sent"] else ""
            lines.append(
                f'| `"{policy}"` | {_failed(w)} | {_failed(c["overall"])}{not_sent} | '
                f"{_ms(w['p50_ms'])} / {_ms(w['p99_ms'])} | "
                f"{_ms(o['p50_ms'])} / {_ms(o['p99_ms'])} | {c['upstream_fetches']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; print the table and write the results."""
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__)
    parser.add_argument("--workers", type=int, default=4, help="uvicorn workers per contender")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s to each contender")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long the load runs")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds Redis is away")
    parser.add_argument("--urls", type=int, default=20)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds an upstream fetch takes")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--max-in-flight", type=int, default=2000, help="per contender")
    parser.add_argument("--mode", dest="modes", action="append", choices=MODES)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--logs", type=Path, help="keep the workers' and the upstream's output in this directory"
    )
    args = parser.parse_args(args_list)
    if not 0 < args.outage < args.seconds:
        parser.error(f"--outage {args.outage:g}: give a positive number below --seconds")
    environment = report.environment(args_list)
    environment["command"] = " ".join(["python -m bench.outage", *args_list])
    environment["packages"]["redis"] = report.version("redis")
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        results = {"environment": environment, **run(args, logs)}
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "outage.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "outage.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
