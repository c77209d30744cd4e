"""Scenario 4: real HTTP, uvicorn on 127.0.0.1 in a subprocess, under a load generator.

The load generator is ``wrk`` when it is installed (Debian: ``apt-get install -y wrk``), else
``bench.loadgen`` (asyncio streams) in its own process. Rounds alternate between the baseline
route and the once route, and the ratio is the median of each round's ratio.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Config

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {"baseline": "/plain", "once": "/once"}
LABELS = {"baseline": "async def returning a global (baseline)", "once": "once"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", ROUTES["baseline"])
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process has used so far, where /proc tells it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _server() -> Iterator[tuple[int, int]]:
    """Start uvicorn on a free port; yield (port, pid) once it answers."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.http_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    process = subprocess.Popen(command, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {' '.join(command)}")
            time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wrk(url: str, seconds: float, connections: int) -> dict[str, float]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    duration = max(1, round(seconds))
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{duration}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", out)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    seconds = float(done.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[done.group(3)]
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return {
        "rps": int(done.group(1)) / seconds,
        "seconds": seconds,
        "errors": int(errors.group(1)) if errors else 0,
    }


def _python(url: str, seconds: float, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            url,
            "--seconds",
            str(seconds),
            "--connections",
            str(connections),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    return {
        "rps": result["requests"] / result["seconds"],
        "seconds": result["seconds"],
        "errors": result["errors"],
    }


def run(config: Config, loadgen: str = "auto") -> dict[str, Any]:
    """Requests/second of the baseline and the once route; ``loadgen`` is auto, wrk or python."""
    note = ""
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
        if loadgen == "python":
            note = "wrk is not installed: used the bench's asyncio load generator instead"
            print(f"[bench] {note}", file=sys.stderr)
    elif loadgen == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("--loadgen wrk: wrk is not installed (Debian: apt-get install -y wrk)")
    measure = _wrk if loadgen == "wrk" else _python
    rps: dict[str, list[float]] = {cid: [] for cid in ROUTES}
    # Requests per CPU-second of the server process: less disturbed by other processes.
    cpu_rps: dict[str, list[float]] = {cid: [] for cid in ROUTES}
    errors = 0
    with _server() as (port, pid):
        urls = {cid: f"http://127.0.0.1:{port}{path}" for cid, path in ROUTES.items()}
        for url in urls.values() if config.http_warm_up else ():
            measure(url, min(config.http_seconds, 1.0), config.http_connections)
        for round_ in range(config.http_rounds):
            order = list(ROUTES) if round_ % 2 == 0 else list(reversed(ROUTES))
            for cid in order:
                cpu_before = cpu_seconds(pid)
                result = measure(urls[cid], config.http_seconds, config.http_connections)
                cpu_after = cpu_seconds(pid)
                rps[cid].append(result["rps"])
                if cpu_before is not None and cpu_after is not None and cpu_after > cpu_before:
                    served = result["rps"] * result["seconds"]
                    cpu_rps[cid].append(served / (cpu_after - cpu_before))
                errors += int(result["errors"])
    base, cpu_base = rps["baseline"], cpu_rps["baseline"]
    return {
        "loadgen": loadgen,
        "note": note,
        "server": "uvicorn, 1 worker, 127.0.0.1",
        "connections": config.http_connections,
        "seconds_per_round": config.http_seconds,
        "rounds": config.http_rounds,
        "errors": errors,
        "contenders": {
            cid: {
                "label": LABELS[cid],
                "rps_median": statistics.median(values),
                "ratio_to_baseline": statistics.median(
                    v / b for v, b in zip(values, base, strict=True)
                ),
                "cpu_ratio_to_baseline": (
                    statistics.median(v / b for v, b in zip(cpu_rps[cid], cpu_base, strict=True))
                    if cpu_rps[cid] and len(cpu_rps[cid]) == len(cpu_base)
                    else None
                ),
                "rps_rounds": values,
                "cpu_rps_rounds": cpu_rps[cid],
            }
            for cid, values in rps.items()
        },
    }
