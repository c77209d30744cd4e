"""``python -m example_app``: serve the example with uvicorn workers and fire cold requests at it.

The workers (``--workers``, default 2) share one socket and one SQLite file. Each calls the
once-per-deployment migration at startup, and one of them runs it. The burst hits the routes whose
onces are not made yet (the model, and the keyed fetch over a handful of URLs) all at once, from
the raw HTTP/1.1 client of :mod:`example_app.client`, which opens its connections first and then
writes every request in one loop. Then ``GET /migrations`` says how many times the migration ran in
total, and ``GET /worker``, asked on new connections until every worker has answered, how many
times each setup ran in that worker and when each was ready. Single-flight means once per setup in
each worker (once per distinct URL for the keyed fetch), whatever the concurrency, and once in
total for the migration.

Each phase is said on stderr as it starts (:class:`Progress`); the report goes to stdout. Each
response names the worker that answered and when its app received the request, so the report can
split the requests into those that waited for a setup and those served warm (:func:`classify`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

import anyio
import httpx

import example_app

from . import client, preflight

PREDICT = "/predict?text=a+good+day"
URLS = tuple(f"/items/{i}" for i in range(1, 6))

#: How many uvicorn worker processes ``python -m example_app`` starts by default.
DEFAULT_WORKERS = 2

#: The unkeyed setups each route needs; ``database`` and ``schema`` are made at startup.
STARTUP_SETUPS = ("database", "schema")
ROUTE_SETUPS = {"/predict": ("sentiment_model",), "/stuff": ("http_client",)}

#: The setup that runs once per deployment (in one worker); the others run once in each worker.
DEPLOYMENT_SETUP = "schema"


def paths(n: int) -> list[str]:
    """The burst's request paths: half to the model, half spread over :data:`URLS`."""
    return [PREDICT if i % 2 == 0 else f"/stuff?url={URLS[i // 2 % len(URLS)]}" for i in range(n)]


def expected_stats(sent: Sequence[str]) -> dict[str, dict[str, int]]:
    """What ``GET /stats`` must say after a burst of ``sent`` in one process: every setup, once.

    With several workers it is what :attr:`Result.stats` must say.
    """
    setups = dict.fromkeys(STARTUP_SETUPS, 1)
    fetches = {}
    for path in sent:
        route, _, query = path.partition("?")
        setups.update(dict.fromkeys(ROUTE_SETUPS[route], 1))
        if route == "/stuff":
            fetches[query.removeprefix("url=")] = 1
    return {"setups": setups, "fetches": fetches}


# --- the server -----------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """The server exited, or did not answer, before it served."""


@contextmanager
def serve(
    app: str = "example_app:app",
    *,
    workers: int = 1,
    environ: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> Iterator[str]:
    """Run ``app`` under uvicorn in a child process on a free port; yield its base URL.

    Returns once the app answers ``GET /healthz``; stops the server (SIGTERM, so each worker's
    lifespan shutdown runs) on exit.

    Args:
        app: the app's import string.
        workers: how many worker processes serve the one socket.
        environ: variables to set for the server, on top of this process's environment.
        timeout: the longest to wait for the first answer, in seconds.

    Raises:
        ServerError: the server exited or did not answer within ``timeout`` seconds.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        host, port = sock.getsockname()
        # The child must import this package from wherever the parent did.
        root = os.path.dirname(os.path.dirname(os.path.abspath(example_app.__file__)))
        env = {
            **os.environ,
            **(environ or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        fd = sock.fileno()
        command = [
            *(sys.executable, "-m", "example_app.server", "--fd", str(fd), "--app", app),
            *("--workers", str(workers)),
        ]
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
                raise ServerError(
                    f"the server exited with code {process.returncode} before it served"
                )
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the server did not answer at {base_url} in {timeout:.0f} s")
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


#: The parts of a request's latency: from its write until its worker's app received it (accepting
#: and parsing, behind the other requests); then until the setups it needs were ready there (zero
#: if they already were); then until its response's last byte reached the client.
TO_THE_APP = "to the app"
WAITING = "waiting for the setup"
ANSWERING = "answering"

#: What ``GET /stats`` says: ``{"setups": {name: runs}, "fetches": {url: fetches}}``.
Stats = dict[str, dict[str, int]]


@dataclass
class Result:
    """What a burst saw."""

    base_url: str
    sent: list[str]
    workers: int = 1
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bodies: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: Each worker's ``GET /stats``, by pid.
    processes: dict[int, Stats] = field(default_factory=dict)
    #: The migration's runs that the shared database logged (``GET /migrations``).
    migrations: list[dict[str, Any]] = field(default_factory=list)
    #: Latencies of the requests that reached their worker before the setups they need were
    #: ready there, so waited for them; and of those that reached it after, served warm.
    waited: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    #: How many connections carried the requests (0: not known).
    connections: int = 0
    #: Seconds to open the connections, and to write every first request on them.
    connect_seconds: float = 0.0
    send_seconds: float = 0.0
    #: Each answered request's latency in three parts (:data:`TO_THE_APP`, :data:`WAITING`,
    #: :data:`ANSWERING`), in seconds.
    parts: dict[str, list[float]] = field(
        default_factory=lambda: {TO_THE_APP: [], WAITING: [], ANSWERING: []}
    )

    @property
    def expected(self) -> Stats:
        """What :attr:`stats` should say."""
        return expected_stats(self.sent)

    @property
    def stats(self) -> Stats:
        """The deployment's counts: the migration's runs in total, as the database logged them;
        every other setup's, and each URL's fetches, the most in any one worker."""
        setups: dict[str, int] = dict.fromkeys(STARTUP_SETUPS, 0)
        fetches: dict[str, int] = {}
        for stats in self.processes.values():
            for name, count in stats.get("setups", {}).items():
                setups[name] = max(setups.get(name, 0), count)
            for url, count in stats.get("fetches", {}).items():
                fetches[url] = max(fetches.get(url, 0), count)
        setups[DEPLOYMENT_SETUP] = len(self.migrations)
        return {"setups": setups, "fetches": dict(sorted(fetches.items()))}

    @property
    def problems(self) -> list[str]:
        """What went wrong, one line each; empty if all went as it should."""
        problems = []
        if self.errors:
            problems.append(f"{len(self.errors)} of {len(self.sent)} requests failed")
        if len(self.processes) != self.workers:
            problems.append(f"{len(self.processes)} of {self.workers} workers answered GET /worker")
        runs = len(self.migrations)
        if runs != 1:
            problems.append(f"the migration ran {runs} times in total")
        counted = sum(s.get("setups", {}).get(DEPLOYMENT_SETUP, 0) for s in self.processes.values())
        if len(self.processes) == self.workers and counted != runs:
            problems.append(
                f"the workers' counts of the migration add up to {counted}, its log to {runs}"
            )
        for pid, stats in sorted(self.processes.items()):
            for name, count in stats.get("setups", {}).items():
                if count > 1:
                    problems.append(f"pid {pid} ran {name} {count} times")
            for url, count in stats.get("fetches", {}).items():
                if count > 1:
                    problems.append(f"pid {pid} fetched {url} {count} times")
        if self.stats != self.expected:
            problems.append(
                f"expected setups {_counts(self.expected['setups'])}, fetches "
                f"{_counts(self.expected['fetches'])}; got setups {_counts(self.stats['setups'])}, "
                f"fetches {_counts(self.stats['fetches'])}"
            )
        # Each worker has its own model and fetches: one value per path in each worker.
        problems.extend(
            f"{len(bodies)} different responses to {path} from {self.workers} workers"
            for path, bodies in self.bodies.items()
            if len(bodies) > self.workers
        )
        return problems

    @property
    def ok(self) -> bool:
        """Whether every request succeeded, each worker shared one value per path, every worker
        ran each setup once, and the migration ran once in total."""
        return not self.problems


class Progress:
    """Says what the main job is doing, as it does it, one line at a time, on stderr.

    Each line starts with the seconds since the job started.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        """Print ``text`` (nothing if there is no stream)."""
        if self.stream is not None:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:5.1f} s] {text}", file=self.stream, flush=True)


#: How often the burst says how many requests have been answered, in seconds.
PROGRESS_EVERY = 0.5


def setups_ready_at(path: str, worker: Mapping[str, Any]) -> float | None:
    """When every setup that ``path`` needs was ready in ``worker`` (its ``GET /worker``).

    None if one of them was never made there.
    """
    route, _, query = path.partition("?")
    ready = worker.get("ready_at", {})
    times = [ready.get(name) for name in ROUTE_SETUPS[route]]
    if route == "/stuff":
        times.append(worker.get("fetched_at", {}).get(query.removeprefix("url=")))
    return None if None in times else max(t for t in times if t is not None)


def classify(
    result: Result,
    answers: Sequence[client.Answer],
    workers: Mapping[int, Any],
    wall_offset: float,
) -> None:
    """Fill ``result``'s latencies, errors, bodies, its waited/warm split and :attr:`Result.parts`.

    A request waited for a setup if its worker received it (``x-received-at``) before the setups
    its route needs were ready in that worker (``workers``: each one's ``GET /worker`` by pid).
    ``wall_offset`` turns the client's :func:`time.perf_counter` into the server's
    :func:`time.time` (one host, one clock).
    """
    for answer in answers:
        if answer.error:
            result.errors.append(answer.error)
            continue
        result.latencies.append(answer.latency)
        body = answer.body.decode("utf-8", "replace")
        if answer.status != 200:
            result.errors.append(f"GET {answer.path}: {answer.status} {body[:200]}")
            continue
        result.bodies[answer.path].add(body)
        try:
            pid = int(answer.headers["x-worker"])
            received = float(answer.headers["x-received-at"])
        except (KeyError, ValueError):
            ready = None
        else:
            ready = setups_ready_at(answer.path, workers.get(pid, {}))
        if ready is None:  # not told: count it as waiting, but do not guess its parts
            result.waited.append(answer.latency)
            continue
        (result.warm if received >= ready else result.waited).append(answer.latency)
        sent, answered = answer.sent + wall_offset, answer.answered + wall_offset
        result.parts[TO_THE_APP].append(max(0.0, received - sent))
        result.parts[WAITING].append(max(0.0, ready - received))
        result.parts[ANSWERING].append(max(0.0, answered - max(received, ready)))


async def burst(
    base_url: str,
    sent: list[str],
    concurrency: int,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Result:
    """Send ``sent`` at once over ``concurrency`` connections, then read what the app counted.

    Waits first until every one of ``workers`` serves, so that the burst reaches them all; then
    opens the connections, writes a request on each in one loop, and sends each connection's next
    request (if ``concurrency`` is below ``len(sent)``) when its previous one is answered.
    """
    result = Result(base_url, sent, workers)
    progress = progress or Progress()
    progress(f"serving at {base_url}; waiting for {_plural(workers, 'worker')} to answer")
    await ask_workers(base_url, workers)
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    count = result.connections = min(concurrency, len(sent))
    progress(f"{_plural(workers, 'worker')} answered; opening {count} connections")
    start = time.perf_counter()
    connections = await client.open_connections(host, port, count)
    result.connect_seconds = time.perf_counter() - start
    answered = failed = 0
    total = len(sent)

    def count_line() -> str:
        return f"{answered}/{total} answered" + (f", {failed} failed" if failed else "")

    def on_sent() -> None:
        result.send_seconds = time.perf_counter() - sent_at
        progress(
            f"burst sent: {count} requests written in {1000 * result.send_seconds:.0f} ms "
            f"(connections opened in {result.connect_seconds:.2f} s)"
        )

    def on_answer(answer: client.Answer) -> None:
        nonlocal answered, failed
        if answer.error:
            failed += 1
        else:
            answered += 1

    async def tell() -> None:
        said = ""
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            if count_line() != said:
                said = count_line()
                progress(said)

    wall_offset = time.time() - time.perf_counter()
    teller = asyncio.ensure_future(tell())
    sent_at = time.perf_counter()
    try:
        answers = await client.burst(
            host, port, connections, sent, on_sent=on_sent, on_answer=on_answer
        )
    finally:
        teller.cancel()
    result.seconds = time.perf_counter() - sent_at
    progress(f"{count_line()} in {result.seconds:.2f} s; asking each worker")
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        response = await http.get("/migrations")
        response.raise_for_status()
        result.migrations = response.json()["runs"]
    replies = await ask_workers(base_url, workers)
    result.processes = {
        pid: {"setups": reply["setups"], "fetches": reply["fetches"]}
        for pid, reply in replies.items()
    }
    classify(result, answers, replies, wall_offset)
    return result


async def ask_workers(
    base_url: str, workers: int, within: float = 20.0
) -> dict[int, dict[str, Any]]:
    """Return each worker's ``GET /worker`` by pid, once all ``workers`` answered or ``within`` s.

    Asks ``GET /worker`` in rounds of concurrent requests, each on a new connection, so that the
    kernel hands them to whichever workers accept.
    """
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + within
    limits = httpx.Limits(max_keepalive_connections=0)

    async def ask(client: httpx.AsyncClient) -> None:
        try:
            response = await client.get("/worker")
        except httpx.HTTPError:
            return
        if response.status_code == 200:
            body = response.json()
            seen[body["pid"]] = body

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=5.0) as client:
        while len(seen) < workers and time.monotonic() < deadline:
            async with anyio.create_task_group() as group:
                for _ in range(4 * workers):
                    group.start_soon(ask, client)
            if len(seen) < workers:
                await anyio.sleep(0.05)
    return seen


# --- the report -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of non-empty ``sorted_values``."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _p50_p99(seconds: Sequence[float]) -> str:
    if not seconds:
        return ""
    ms = sorted(1000 * s for s in seconds)
    return f": latency p50 {percentile(ms, 50):.0f}  p99 {percentile(ms, 99):.0f} ms"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _counts(counts: dict[str, Any]) -> str:
    return " ".join(f"{name}={count}" for name, count in counts.items()) or "(none)"


def report(result: Result) -> str:
    """A few lines: setups, fetches, requests, latency, the migration, each worker, the verdict."""
    stats = result.stats
    ok_requests = len(result.sent) - len(result.errors)
    distinct = sum(len(bodies) for bodies in result.bodies.values())
    workers = f"{result.workers} worker{'s' if result.workers != 1 else ''}"
    n = len(result.sent)
    what = (
        f"{n} cold requests, {result.connections} at a time,"
        if 0 < result.connections < n
        else f"{n} concurrent cold requests"
    )
    lines = [
        f"{what} to uvicorn at {result.base_url} ({workers})",
        f"  setups    {_counts(stats['setups'])}  (expected 1 each: {DEPLOYMENT_SETUP} in total, "
        "the others in each worker)",
        f"  fetches   {_counts(stats['fetches'])}  (expected 1 per URL in each worker)",
        f"  requests  {ok_requests} ok, {len(result.errors)} errors, {distinct} distinct "
        f"responses over {len(result.bodies)} paths, in {result.seconds:.2f} s",
    ]
    if result.latencies:
        ms = sorted(1000 * s for s in result.latencies)
        points = [("min", ms[0]), *((f"p{p}", percentile(ms, p)) for p in (50, 90, 99))]
        spread = "  ".join(f"{label} {value:.0f}" for label, value in [*points, ("max", ms[-1])])
        lines.append(f"  latency   {spread} ms, from writing a request to its last byte back:")
        explained = {
            TO_THE_APP: "its worker accepting and parsing it, behind the others",
            WAITING: "until the setups it needs were ready in that worker",
            ANSWERING: "until its response's last byte reached the client",
        }
        width = max(map(len, result.parts))
        for name, seconds in result.parts.items():
            if seconds:
                ms = sorted(1000 * s for s in seconds)
                lines.append(
                    f"    {name:<{width}}  p50 {percentile(ms, 50):5.0f}  p99 "
                    f"{percentile(ms, 99):5.0f} ms  ({explained[name]})"
                )
        lines.append(
            f"  waited    {_plural(len(result.waited), 'request')} reached their worker before its "
            f"setup was ready{_p50_p99(result.waited)}"
        )
        lines.append(
            f"  warm      {_plural(len(result.warm), 'request')} reached their worker after it, "
            f"served warm{_p50_p99(result.warm)}"
        )
    runs = len(result.migrations)
    by = ", ".join(f"pid {run['pid']}" for run in result.migrations)
    lines.append(
        f"  migration ran {runs} time{'s' if runs != 1 else ''} in total"
        + (f", in {by}" if by else "")
        + " (migrations_log in the shared database)"
    )
    for pid, process in sorted(result.processes.items()):
        lines.append(
            f"  pid {pid}  setups {_counts(process.get('setups', {}))}  "
            f"fetches {_counts(dict(sorted(process.get('fetches', {}).items())))}"
        )
    lines.extend(f"  error     {error}" for error in result.errors[:5])
    if len(result.errors) > 5:
        lines.append(f"  ...       and {len(result.errors) - 5} more errors")
    problems = result.problems
    if not problems:
        lines.append(
            f"OK: the migration ran once in total; in each of the {workers} every setup ran once, "
            "and every request shared its worker's value"
        )
    else:
        lines.extend(f"  problem   {problem}" for problem in problems)
        lines.append(f"FAILED: {len(problems)} problem{'s' if len(problems) != 1 else ''} above")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server, run the burst, print the report; return 0 if all went as it should.

    Says each phase on stderr as it starts. Returns 2, after one line on stderr, if the backend
    that ``EXAMPLE_BACKEND_URL`` names cannot be used (see :func:`example_app.preflight.problem`).
    """
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="how many (default 1000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="connections, so most in flight at once (default: one per request)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"uvicorn worker processes (default {DEFAULT_WORKERS})",
    )
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    problem = preflight.problem(os.environ)
    if problem:
        print(f"python -m example_app: {problem}", file=sys.stderr)
        return 2
    concurrency = args.concurrency or args.requests
    raise_open_files_limit()
    progress = Progress(sys.stderr)
    # The workers share one database file: a fresh one, as for a new deployment.
    with tempfile.TemporaryDirectory(prefix="example_app-") as directory:
        environ = {"EXAMPLE_DB": os.path.join(directory, "example.db")}
        progress(f"starting {_plural(args.workers, 'uvicorn worker')}")
        try:
            with serve(workers=args.workers, environ=environ) as base_url:
                result = anyio.run(
                    burst, base_url, paths(args.requests), concurrency, args.workers, progress
                )
        except ServerError as exc:
            print(f"python -m example_app: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # e.g. more connections than this process may open
            print(
                f"python -m example_app: could not open {concurrency} connections ({exc}): "
                "ask for fewer with --requests or --concurrency",
                file=sys.stderr,
            )
            return 1
    print(report(result))
    return 0 if result.ok else 1
