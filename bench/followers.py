"""``python -m bench.followers``: how fast 15 waiting processes learn that the leader finished.

Per backend, each round starts ``--processes`` worker processes (16 by default) that call one
once with ``across=`` together: one leads and works for ``--work`` seconds, the others wait. The
latency of a follower is the time from the leader's work returning to that follower's call
returning (wall clock, one host). Then a round per backend kills the leader mid-work with
SIGKILL and times how long until a follower starts the work again.

It starts its own redis-server, PostgreSQL and MariaDB on 127.0.0.1 as the test suite does
(backends whose server or driver is missing are left out, and say why). Prints a table and writes
``bench/results/followers.{json,md}``. Needs ``pip install -e '.[test]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The workers and servers of the backend tests: one implementation of both.
sys.path.insert(0, str(ROOT / "tests" / "backends"))

from backend_servers import (  # noqa: E402
    WORKER,
    read_log,
    start_mariadb,
    start_postgres,
    start_redis,
)

KINDS = ("file", "redis", "postgres", "postgres-xact", "mysql")


def _start(n: int, config: dict[str, Any]) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a worker did not start: {line!r}")
    return procs


def _go(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def _kill(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit {proc.returncode}"}


def follower_latencies(spec: dict[str, Any], processes: int, work: float) -> list[float]:
    """One round: milliseconds from the leader's work returning to each follower's return."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "events.log"
        name = f"bench.followers@{secrets.token_hex(4)}"
        config = {"spec": spec, "log": str(log), "name": name, "result": 1, "sleep": work}
        procs = _start(processes, config)
        try:
            _go(procs)
            reports = [_report(proc) for proc in procs]
        finally:
            _kill(procs)
        bad = [r for r in reports if r.get("ok") != 1]
        if bad:
            raise RuntimeError(f"{spec['kind']}: a worker failed: {bad[0]}")
        end = next(e["t"] for e in read_log(log) if e["event"] == "end")
        return [(r["t"] - end) * 1000 for r in reports if not r["ran"]]


def takeover_after_sigkill(spec: dict[str, Any], processes: int) -> float:
    """Milliseconds from SIGKILL of the leader mid-work to a follower starting the work."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "events.log"
        name = f"bench.takeover@{secrets.token_hex(4)}"
        config = {"spec": spec, "log": str(log), "name": name, "result": 1, "first_sleep": 60}
        procs = _start(processes, config)
        try:
            _go(procs)
            deadline = time.monotonic() + 30
            while not read_log(log):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{spec['kind']}: no leader started")
                time.sleep(0.002)
            leader = read_log(log)[0]["pid"]
            killed = time.time()
            os.kill(leader, signal.SIGKILL)
            for proc in procs:
                if proc.pid != leader:
                    _report(proc)
        finally:
            _kill(procs)
        starts = [e for e in read_log(log) if e["event"] == "start"]
        return (starts[1]["t"] - killed) * 1000


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; print the table and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.followers", description=__doc__)
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=float, default=0.5, help="seconds the leader works")
    parser.add_argument("--only", action="append", choices=KINDS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    servers: list[Any] = []
    specs: dict[str, dict[str, Any]] = {}
    kinds = args.only or KINDS
    skipped: dict[str, str] = {}
    try:
        specs["file"] = {"kind": "file", "directory": tempfile.mkdtemp(prefix="bench-locks-")}
        if "redis" in kinds:
            try:
                redis = start_redis()
            except BaseException as exc:  # pytest's skip is a BaseException
                skipped["redis"] = str(exc)
            else:
                servers.append(redis)
                specs["redis"] = {"kind": "redis", "url": redis.url, "namespace": "bench"}
                specs["redis"]["lease"] = 1.0
        if {"postgres", "postgres-xact"} & set(kinds):
            try:
                pg = start_postgres()
            except BaseException as exc:
                skipped["postgres"] = skipped["postgres-xact"] = str(exc)
            else:
                servers.append(pg)
                for kind, lock in (("postgres", "session"), ("postgres-xact", "transaction")):
                    specs[kind] = {"kind": kind, "dsn": pg.dsn, "table": "bench", "lock": lock}
        if "mysql" in kinds:
            try:
                mariadb = start_mariadb()
            except BaseException as exc:
                skipped["mysql"] = str(exc)
            else:
                servers.append(mariadb)
                specs["mysql"] = {"kind": "mysql", "url": mariadb.url, "table": "bench"}
        results: dict[str, Any] = {
            "processes": args.processes,
            "rounds": args.rounds,
            "work_s": args.work,
            "cpus": os.cpu_count(),
            "load_average_before": os.getloadavg()[0],
            "backends": {},
            "skipped": skipped,
        }
        for kind in kinds:
            if kind not in specs:
                continue
            print(f"[bench.followers] {kind} ...", file=sys.stderr, flush=True)
            latencies: list[float] = []
            for _ in range(args.rounds):
                latencies += follower_latencies(specs[kind], args.processes, args.work)
            takeover = takeover_after_sigkill(specs[kind], args.processes)
            results["backends"][kind] = {
                "followers": len(latencies),
                "p50_ms": statistics.median(latencies),
                "p99_ms": _percentile(latencies, 0.99),
                "max_ms": max(latencies),
                "takeover_after_sigkill_ms": takeover,
            }
        results["load_average_after"] = os.getloadavg()[0]
    finally:
        for server in servers:
            server.stop()
    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "followers.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "followers.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        f"{results['processes']} processes ({results['processes'] - 1} followers), "
        f"{results['rounds']} rounds, {results['cpus']} CPUs, 1-minute load average "
        f"{results['load_average_before']:.1f} before and {results['load_average_after']:.1f} "
        "after; from the leader's work returning to each follower's call returning:",
        "",
        "| backend | followers | p50 | p99 | max | takeover after SIGKILL |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in results["backends"].items():
        lines.append(
            f"| {kind} | {r['followers']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
            f"{r['max_ms']:.1f} ms | {r['takeover_after_sigkill_ms']:.0f} ms |"
        )
    for kind, why in results["skipped"].items():
        lines.append(f"| {kind} | skipped: {why} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
