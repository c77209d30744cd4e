"""``python -m example_app``: start the example under uvicorn and fire a burst of cold requests.

The burst hits the routes whose onces are not made yet (the model, and the keyed fetch over a
handful of URLs) all at once, then asks ``GET /stats`` how many times each setup ran. Single-flight
means once per setup (once per distinct URL for the keyed fetch), whatever the concurrency.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

import example_app

PREDICT = "/predict?text=a+good+day"
URLS = tuple(f"/items/{i}" for i in range(1, 6))

#: The unkeyed setups each route needs; ``database`` and ``schema`` are made at startup.
STARTUP_SETUPS = ("database", "schema")
ROUTE_SETUPS = {"/predict": ("sentiment_model",), "/stuff": ("http_client",)}


def paths(n: int) -> list[str]:
    """The burst's request paths: half to the model, half spread over :data:`URLS`."""
    return [PREDICT if i % 2 == 0 else f"/stuff?url={URLS[i // 2 % len(URLS)]}" for i in range(n)]


def expected_stats(sent: Sequence[str]) -> dict[str, dict[str, int]]:
    """What ``GET /stats`` must say after a burst of ``sent``: every setup that ran, once."""
    setups = dict.fromkeys(STARTUP_SETUPS, 1)
    fetches = {}
    for path in sent:
        route, _, query = path.partition("?")
        setups.update(dict.fromkeys(ROUTE_SETUPS[route], 1))
        if route == "/stuff":
            fetches[query.removeprefix("url=")] = 1
    return {"setups": setups, "fetches": fetches}


# --- the server -----------------------------------------------------------------------------------


@contextmanager
def serve(app: str = "example_app:app", *, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a child process on a free port; yield its base URL.

    Returns once the app answers ``GET /healthz``; stops the server (SIGTERM, so its lifespan's
    shutdown runs) on exit.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` seconds.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        host, port = sock.getsockname()
        # The child must import this package from wherever the parent did.
        root = os.path.dirname(os.path.dirname(os.path.abspath(example_app.__file__)))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        fd = sock.fileno()
        command = [sys.executable, "-m", "example_app.server", "--fd", str(fd), "--app", app]
        process = subprocess.Popen(command, pass_fds=[fd], env=env)
    # Only the child holds the socket now: if it dies, connecting fails instead of hanging.
    base_url = f"http://{host}:{port}"
    try:
        _wait_until_serving(process, base_url, timeout)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen[bytes], base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, timeout=1.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer at {base_url} in {timeout:.0f} s")
            time.sleep(0.05)


def raise_open_files_limit() -> int | None:
    """Raise the soft limit on open files to the hard limit; return the new soft limit.

    Each concurrent request holds a socket in the client and one in the server. Returns None
    where the platform has no such limit (Windows).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # e.g. macOS caps it below an infinite hard limit
            pass
    return soft


# --- the burst ------------------------------------------------------------------------------------


@dataclass
class Result:
    """What a burst saw."""

    base_url: str
    sent: list[str]
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bodies: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def expected(self) -> dict[str, dict[str, int]]:
        """What ``GET /stats`` should say."""
        return expected_stats(self.sent)

    @property
    def ok(self) -> bool:
        """Whether every request succeeded, shared one value per path, and each setup ran once."""
        return (
            not self.errors
            and all(len(bodies) == 1 for bodies in self.bodies.values())
            and self.stats == self.expected
        )


#: Connections per client: httpcore scans its whole pool for each request, so a burst spreads over
#: several small pools rather than one pool of a thousand connections.
POOL_SIZE = 50


async def burst(base_url: str, sent: list[str], concurrency: int) -> Result:
    """Send ``sent`` at once (at most ``concurrency`` in flight), then read ``GET /stats``."""
    result = Result(base_url, sent)
    limit = anyio.Semaphore(concurrency)
    pools = math.ceil(min(concurrency, len(sent)) / POOL_SIZE)
    limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)

    async def one(client: httpx.AsyncClient, path: str) -> None:
        async with limit:
            start = time.perf_counter()
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                result.errors.append(f"GET {path}: {type(exc).__name__}: {exc}")
                return
            result.latencies.append(time.perf_counter() - start)
        if response.status_code != 200:
            result.errors.append(f"GET {path}: {response.status_code} {response.text[:200]}")
        else:
            result.bodies[path].add(response.text)

    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0)
            )
            for _ in range(pools)
        ]
        start = time.perf_counter()
        async with anyio.create_task_group() as group:
            for i, path in enumerate(sent):
                group.start_soon(one, clients[i % pools], path)
        result.seconds = time.perf_counter() - start
        response = await clients[0].get("/stats")
        response.raise_for_status()
        result.stats = response.json()
    return result


# --- the report -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of non-empty ``sorted_values``."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _counts(counts: dict[str, Any]) -> str:
    return " ".join(f"{name}={count}" for name, count in counts.items()) or "(none)"


def report(result: Result) -> str:
    """A few lines: setups, fetches, requests, latency, and the verdict."""
    expected = result.expected
    got_setups = result.stats.get("setups", {})
    got_fetches = dict(sorted(result.stats.get("fetches", {}).items()))
    ok_requests = len(result.sent) - len(result.errors)
    distinct = sum(len(bodies) for bodies in result.bodies.values())
    lines = [
        f"{len(result.sent)} concurrent cold requests to uvicorn at {result.base_url}",
        f"  setups    {_counts(got_setups)}  (expected 1 each)",
        f"  fetches   {_counts(got_fetches)}  (expected 1 per URL)",
        f"  requests  {ok_requests} ok, {len(result.errors)} errors, {distinct} distinct "
        f"responses over {len(result.bodies)} paths, in {result.seconds:.2f} s",
    ]
    if result.latencies:
        ms = sorted(1000 * s for s in result.latencies)
        points = [("min", ms[0]), *((f"p{p}", percentile(ms, p)) for p in (50, 90, 99))]
        spread = "  ".join(f"{label} {value:.0f}" for label, value in [*points, ("max", ms[-1])])
        lines.append(f"  latency   {spread}  (ms)")
    lines.extend(f"  error     {error}" for error in result.errors[:5])
    if len(result.errors) > 5:
        lines.append(f"  ...       and {len(result.errors) - 5} more errors")
    if result.ok:
        lines.append("OK: every setup ran once, every request shared its value")
    else:
        lines.append(
            f"FAILED: expected setups {_counts(expected['setups'])}, fetches "
            f"{_counts(expected['fetches'])}, no errors, one distinct response per path"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server, run the burst, print the report; return 0 if all went as it should."""
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="how many (default 1000)")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="most in flight at once (default: all)"
    )
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    concurrency = args.concurrency or args.requests
    raise_open_files_limit()
    with serve() as base_url:
        result = anyio.run(burst, base_url, paths(args.requests), concurrency)
    print(report(result))
    return 0 if result.ok else 1
