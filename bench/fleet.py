"""``python -m bench.fleet``: keyed fetches across a fleet of worker processes, once vs its peers.

An upstream (``bench.upstream``: real HTTP on 127.0.0.1, ``--delay`` seconds a fetch) counts the
fetches of each URL. Per contender and round, ``--workers`` uvicorn processes (8 by default, one
port each, so that each gets exactly its share) serve ``bench.fleet_app``: one route, whose
``get_stuff(url)`` fetches from the upstream, wrapped by the contender. After one warm-up request
per worker (its own URL, not counted), ``--requests`` concurrent requests (1,000) go out at once,
request ``i`` to worker ``i % workers`` for URL ``(i // workers) % urls``: every worker asks for
every one of the ``--urls`` (100) URLs, all cold. Per contender: the upstream fetches of those
URLs, request latency (p50, p99, max: from sending a request to its response), the run time (the
first request sent to the last response), failed requests, the most distinct values any URL was
served with, the CPU time of the workers and, for Redis contenders, the commands Redis processed
during the load. Rounds rotate the contenders' order; the medians over rounds are reported with
their spread.

It starts its own redis-server and PostgreSQL on 127.0.0.1 as the test suite does (PostgreSQL
with ``--pg-max-connections``, 100); a contender whose server, library or option is missing,
or whose workers fail their first request, is reported as not available, saying why. Prints a
table and writes ``bench/results/fleet.{json,md}``. Needs the ``bench`` and ``test`` groups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import report
from .fleet_app import CONTENDERS, ENV, fetcher
from .paired import ratios, spread
from .real_http import cpu_seconds
from .upstream import counts, get

ROOT = Path(__file__).resolve().parent.parent
# The servers of the backend tests: one implementation of both.
sys.path.insert(0, str(ROOT / "tests" / "backends"))

from backend_servers import free_port, start_postgres, start_redis  # noqa: E402

PACKAGES = ("cashews", "aiocache", "redis", "asyncpg")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}: {log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def upstream(delay: float, directory: Path) -> Iterator[int]:
    """Run ``bench.upstream`` on a free port; yield the port."""
    port = free_port()
    log = directory / "upstream.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--port", str(port), "--delay", str(delay)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, proc, "the upstream", log)
        yield port
    finally:
        _stop([proc])


@dataclasses.dataclass(frozen=True)
class Worker:
    """A uvicorn process of the fleet: where it listens, its process id, where it writes."""

    port: int
    pid: int
    log: Path


@contextlib.contextmanager
def workers(n: int, config: dict[str, Any], directory: Path) -> Iterator[list[Worker]]:
    """Start ``n`` uvicorn processes serving ``config``'s app; yield them once they listen."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), ENV: json.dumps(config)}
    ports = [free_port() for _ in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for port in ports:
            logs.append(directory / f"worker-{port}.log")
            with open(logs[-1], "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            *(sys.executable, "-m", "uvicorn", "bench.fleet_app:app", "--factory"),
                            *("--host", "127.0.0.1", "--port", str(port), "--backlog", "4096"),
                            *("--log-level", "warning", "--no-access-log"),
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        # uvicorn listens once the app is built and its lifespan has started.
        for port, proc, log in zip(ports, procs, logs, strict=True):
            _wait_listening(port, proc, f"worker {config['contender']}", log)
        yield [Worker(*w) for w in zip(ports, (p.pid for p in procs), logs, strict=True)]
    finally:
        _stop(procs)


def _target(path: str) -> str:
    return f"/stuff?url={quote(path, safe='')}"


async def _request(port: int, path: str) -> tuple[float, str | None]:
    """(seconds, the value served) of one request for ``path``; the value is None on an error."""
    started = time.perf_counter()
    try:
        status, body = await get(port, _target(path))
    except (OSError, asyncio.IncompleteReadError):  # refused, reset, or cut off mid-response
        return time.perf_counter() - started, None
    elapsed = time.perf_counter() - started
    value: str | None = json.loads(body)["value"] if status == 200 else None
    return elapsed, value


class FirstRequestError(RuntimeError):
    """A worker failed its first request: the contender does not work here (its log says why)."""


def _last_error(log: Path) -> str:
    """The last exception a traceback in ``log`` ended with (its ``Type: message`` line)."""
    raised = re.compile(r"^[\w.]+(Error|Exception): ")
    lines = [line for line in log.read_text(errors="replace").splitlines() if raised.match(line)]
    return lines[-1].strip() if lines else f"see {log}"


async def _warm(fleet: list[Worker], prefix: str) -> Path | None:
    """One request per worker, for a URL of its own; the log of the first that fails, if any."""
    for w, worker in enumerate(fleet):
        _, value = await _request(worker.port, f"{prefix}warm/{w}")
        if value is None:
            return worker.log
    return None


def _redis_counters(url: str | None) -> tuple[int, float]:
    """Commands Redis has processed and the CPU seconds it has used so far (0, 0 without it)."""
    if url is None:
        return 0, 0.0
    import redis

    with redis.Redis.from_url(url) as client:
        stats, cpu = client.info("stats"), client.info("cpu")
    return int(stats["total_commands_processed"]), cpu["used_cpu_user"] + cpu["used_cpu_sys"]


async def _load(
    ports: list[int], prefix: str, requests: int, urls: int
) -> tuple[list[float], dict[str, set[str]], int, float]:
    """Send every request at once; latencies, values seen per URL, errors and the run time."""
    paths = [f"{prefix}item/{(i // len(ports)) % urls}" for i in range(requests)]
    started = time.perf_counter()
    done = await asyncio.gather(
        *(_request(ports[i % len(ports)], path) for i, path in enumerate(paths))
    )
    run_s = time.perf_counter() - started
    seen: dict[str, set[str]] = {}
    errors = 0
    for path, (_, value) in zip(paths, done, strict=True):
        if value is None or not value.startswith(f"{path} v"):
            errors += 1
        else:
            seen.setdefault(path, set()).add(value)
    return [d[0] for d in done], seen, errors, run_s


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_run(
    contender: str, base: dict[str, Any], args: argparse.Namespace, prefix: str, directory: Path
) -> dict[str, Any]:
    """One contender's run of the load on fresh workers; what it measured."""
    config = {**base, "contender": contender, "name": f"bench.fleet{prefix.replace('/', '.')}"}
    redis_url = base.get("redis") if CONTENDERS[contender][1] == "redis" else None
    with workers(args.workers, config, directory) as fleet:
        failed = asyncio.run(_warm(fleet, prefix))
        if failed is None:
            ports = [worker.port for worker in fleet]
            commands_before, redis_cpu_before = _redis_counters(redis_url)
            cpu_before = sum(cpu_seconds(worker.pid) or 0.0 for worker in fleet)
            latencies, seen, errors, run_s = asyncio.run(
                _load(ports, prefix, args.requests, args.urls)
            )
            cpu = sum(cpu_seconds(worker.pid) or 0.0 for worker in fleet) - cpu_before
            commands, redis_cpu = _redis_counters(redis_url)
            fetched = asyncio.run(counts(base["upstream"], f"{prefix}item/"))
    if failed is not None:  # read once the worker has stopped: uvicorn logs after answering
        raise FirstRequestError(f"the first request failed: {_last_error(failed)}")
    ms = [s * 1000 for s in latencies]
    return {
        "fetches": sum(fetched.values()),
        "urls_fetched": len(fetched),
        "most_fetches_of_a_url": max(fetched.values(), default=0),
        "most_values_of_a_url": max((len(v) for v in seen.values()), default=0),
        "errors": errors,
        "p50_ms": statistics.median(ms),
        "p99_ms": _percentile(ms, 0.99),
        "max_ms": max(ms),
        "run_s": run_s,
        "workers_cpu_s": cpu,
        # The load's commands, and the 2 INFO commands that read the counts before it.
        "redis_commands": commands - commands_before,
        "redis_cpu_s": redis_cpu - redis_cpu_before,
    }


def _unavailable(contender: str, base: dict[str, Any], skipped: dict[str, str]) -> str | None:
    """Why ``contender`` cannot run here, or None: its server, its library, or once's refusal."""
    server = CONTENDERS[contender][1]
    if server is not None and base.get(server) is None:
        return skipped.get(server, f"no {server} server")
    try:
        fetcher(contender, {**base, "contender": contender, "name": f"bench.fleet.{contender}"})
    except (TypeError, ImportError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "fetches",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "run_s",
        "workers_cpu_s",
        "redis_commands",
        "redis_cpu_s",
    )
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    summary["spread"] = {k: spread([r[k] for r in runs]) for k in keys}
    for k in ("errors", "most_fetches_of_a_url", "most_values_of_a_url"):
        summary[k] = max(r[k] for r in runs)
    summary["runs"] = runs
    return summary


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Start the servers and the upstream, run every round; the results."""
    chosen = args.only or list(CONTENDERS)
    needed = {CONTENDERS[c][1] for c in chosen}
    servers: list[Any] = []
    skipped: dict[str, str] = {}
    base: dict[str, Any] = {"ttl": args.ttl}
    try:
        if "redis" in needed:
            try:
                redis = start_redis()
            except BaseException as exc:  # pytest's skip is a BaseException
                skipped["redis"] = str(exc)
            else:
                servers.append(redis)
                base["redis"] = redis.url
        if "postgres" in needed:
            try:
                pg = start_postgres(max_connections=str(args.pg_max_connections))
            except BaseException as exc:
                skipped["postgres"] = str(exc)
            else:
                servers.append(pg)
                base["postgres"] = pg.dsn
        with upstream(args.delay, directory) as port:
            base["upstream"] = port
            unavailable = {c: why for c in chosen if (why := _unavailable(c, base, skipped))}
            contenders = [c for c in chosen if c not in unavailable]
            load_before = os.getloadavg()[0]
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
            started = time.perf_counter()
            for round_ in range(args.rounds):
                shift = round_ % max(1, len(contenders))
                for contender in contenders[shift:] + contenders[:shift]:
                    if contender in unavailable:
                        continue
                    print(f"[bench.fleet] round {round_ + 1}: {contender}", file=sys.stderr)
                    prefix = f"/r{round_}-{secrets.token_hex(3)}/{contender}/"
                    try:
                        runs[contender].append(one_run(contender, base, args, prefix, directory))
                    except FirstRequestError as exc:
                        unavailable[contender] = str(exc)
            contenders = [c for c in contenders if c not in unavailable]
            seconds = time.perf_counter() - started
            load_after = os.getloadavg()[0]
    finally:
        for server in servers:
            server.stop()
    results: dict[str, Any] = {
        "workers": args.workers,
        "requests": args.requests,
        "urls": args.urls,
        "fetch_delay_s": args.delay,
        "ttl_s": args.ttl,
        "postgres_max_connections": args.pg_max_connections,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "seconds": seconds,
        "contenders": {},
        "not_available": {c: {"label": CONTENDERS[c][0], "why": w} for c, w in unavailable.items()},
        "servers_missing": skipped,
    }
    reference = runs.get("once")
    for contender in contenders:
        label, server = CONTENDERS[contender]
        summary = {"label": label, "server": server, **_summary(runs[contender])}
        if reference:
            # Run time over the per-process once's, each pair from the same round.
            summary["run_over_once"] = ratios(
                [r["run_s"] for r in runs[contender]], [r["run_s"] for r in reference]
            )
        results["contenders"][contender] = summary
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        f"{results['requests']:,} concurrent requests over {results['urls']} cold URLs, "
        f"{results['workers']} uvicorn worker processes, each fetch taking "
        f"{results['fetch_delay_s'] * 1000:.0f} ms upstream; {results['rounds']} rotated rounds "
        f"(medians; fetches and run time with their range; failed requests: the most in a "
        f"round); {results['cpus']} CPUs, 1-minute "
        f"load average {results['load_average_before']:.1f} before and "
        f"{results['load_average_after']:.1f} after.",
        "",
        "| contender | upstream fetches | p50 | p99 | max | run time | workers' CPU | Redis "
        "commands | failed requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["contenders"].values():
        fetches, run_s = c["spread"]["fetches"], c["spread"]["run_s"]
        fetch_range = (
            f" ({fetches['min']:g}-{fetches['max']:g})" if fetches["min"] != fetches["max"] else ""
        )
        redis_commands = f"{c['redis_commands']:,.0f}" if c["server"] == "redis" else ""
        lines.append(
            f"| {c['label']} | {c['fetches']:g}{fetch_range} | {c['p50_ms']:.0f} ms | "
            f"{c['p99_ms']:.0f} ms | {c['max_ms']:.0f} ms | {c['run_s'] * 1000:.0f} ms "
            f"({run_s['min'] * 1000:.0f}-{run_s['max'] * 1000:.0f}) | "
            f"{c['workers_cpu_s']:.1f} s | {redis_commands} | {c['errors']} |"
        )
    for c in results["not_available"].values():
        lines.append(f"| {c['label']} | not available: {c['why']} | | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; print the table and write the results."""
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--urls", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds an upstream fetch takes")
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--pg-max-connections",
        type=int,
        default=100,
        help="the PostgreSQL server's max_connections (default 100, the server's own default)",
    )
    parser.add_argument("--only", action="append", choices=list(CONTENDERS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--logs", type=Path, help="keep the workers' and the upstream's output in this directory"
    )
    args = parser.parse_args(args_list)
    environment = report.environment(args_list)
    environment["command"] = " ".join(["python -m bench.fleet", *args_list])
    environment["packages"].update({name: report.version(name) for name in PACKAGES})
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        results = {"environment": environment, **run(args, logs)}
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "fleet.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
