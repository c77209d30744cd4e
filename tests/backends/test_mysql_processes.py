"""MySQLBackend across real processes on the suite's MariaDB server: one run among 16, one
fetch per key among 4 processes, a killed leader, a server restart mid-work."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backend_servers import MariaDBServer, Worker, wait_for
from test_across_processes import RESULT, config, run_all, starts
from test_keyed_fleet import Process, fleet, log_of, ok  # noqa: F401 - fleet is a fixture
from test_keyed_fleet import starts as key_starts

pytestmark = [pytest.mark.kinds("mysql"), pytest.mark.timeout(120)]


def test_the_work_runs_once_among_16_processes_and_each_gets_its_result(
    spec: dict[str, Any], tmp_path: Path, start_workers: Callable[..., list[Worker]]
) -> None:
    """Sixteen processes call the once together: one runs it, every one gets its result."""
    cfg = config(spec, tmp_path, sleep=0.5)
    outcomes = run_all(start_workers(16, cfg))
    assert all(o.get("ok") == RESULT for o in outcomes), outcomes
    assert [o["ran"] for o in outcomes].count(True) == 1
    assert len(starts(Path(cfg["log"]))) == 1


def test_each_key_runs_once_among_4_processes_with_5_callers_each(
    spec: dict[str, Any],
    tmp_path: Path,
    fleet: Callable[..., list[Process]],  # noqa: F811 - the fixture imported above
) -> None:
    """Four processes, five concurrent callers each, ten keys: ten runs in all, and all 200
    callers got their key's one value."""
    urls = [f"https://example.test/{i}" for i in range(10)]
    processes = fleet(4, sleep=0.5)
    for process in processes:
        process.send({"call": urls, "each": 5})
    for process in processes:
        for url, outcomes in zip(urls, process.reply()["results"], strict=True):
            assert [ok(o) for o in outcomes] == [{"url": url, "run": 1, "bytes": 0}] * 5
    log = log_of(spec, tmp_path)
    assert {url: len(key_starts(log, url)) for url in urls} == dict.fromkeys(urls, 1)


def test_a_killed_leaders_lock_session_ends_and_a_follower_takes_over_at_once(
    spec: dict[str, Any],
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    record_figure: Callable[[str], None],
) -> None:
    """SIGKILL mid-work: the server ends the leader's lock session, so a follower leads long
    before the lease (10 s) would have ended, with a larger fencing token."""
    cfg = config(spec, tmp_path, first_sleep=60)
    workers = start_workers(3, cfg)
    for worker in workers:
        worker.go()
    log = Path(cfg["log"])
    wait_for(lambda: bool(starts(log)), what="the leader to start")
    leader = starts(log)[0]
    killed_at = time.time()
    os.kill(leader["pid"], signal.SIGKILL)
    outcomes = [w.outcome() for w in workers if w.proc.pid != leader["pid"]]
    assert all(o.get("ok") == RESULT for o in outcomes), outcomes
    runs = starts(log)
    assert len(runs) == 2
    assert runs[1]["fence"] > runs[0]["fence"]
    takeover = runs[1]["t"] - killed_at
    record_figure(f"mysql: a follower took over {takeover * 1000:.0f} ms after SIGKILL")
    assert takeover < 5  # far below the 10 s lease: the lock ended with its session


def test_a_server_restart_mid_work_loses_the_lease_and_the_next_leader_has_a_larger_fence(
    spec: dict[str, Any],
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    mariadb_server: MariaDBServer,
    record_figure: Callable[[str], None],
) -> None:
    """The server is shut down and started again while the leader works: its lock session is
    gone, so its renewal fails (LeaseLostError, nothing recorded) and a follower leads with a
    fencing token larger than the first (the counter is durable)."""
    cfg = config(spec, tmp_path, first_sleep=60, sleep=0.3, options={"lease": 3.0})
    workers = start_workers(3, cfg)
    for worker in workers:
        worker.go()
    log = Path(cfg["log"])
    wait_for(lambda: bool(starts(log)), what="the leader to start")
    leader = starts(log)[0]
    restarted = time.time()
    mariadb_server.restart()
    up = time.time()
    late = start_workers(1, cfg)[0]  # a process whose first contact is after the restart
    late.go()
    outcomes = {w.proc.pid: w.outcome(timeout=60) for w in [*workers, late]}
    assert outcomes[leader["pid"]]["error"] == "LeaseLostError", outcomes
    assert outcomes[late.proc.pid]["ok"] == RESULT, outcomes
    for outcome in outcomes.values():
        # A follower that took over while the server was shutting down loses its lease too;
        # one whose first contact met the restart fails at once (unkeyed: on_backend_error
        # "raise"); the others get the result.
        assert (
            outcome.get("ok") == RESULT
            or (outcome["error"] == "LeaseLostError" and outcome["ran"])
            or (outcome["error"] == "StoreUnavailableError" and not outcome["ran"])
        ), outcomes
    runs = starts(log)
    fences = [run["fence"] for run in runs]
    assert len(fences) >= 2
    assert fences == sorted(set(fences)), fences  # each leader's is larger
    record_figure(
        f"mysql: server down {(up - restarted) * 1000:.0f} ms; the next leader started "
        f"{(runs[-1]['t'] - up) * 1000:.0f} ms after it was up (fences {fences})"
    )
