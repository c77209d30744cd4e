"""A once with ``across=`` in several real processes: one run, one result, prompt followers."""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backend_servers import Worker, read_log, wait_for

RESULT = {"migrated": 3, "tables": ["a", "b"], "note": None}


def config(spec: dict[str, Any], tmp_path: Path, **options: Any) -> dict[str, Any]:
    return {
        "spec": spec,
        "log": str(tmp_path / "events.log"),
        "name": f"tests.deploy.migrate@{secrets.token_hex(4)}",
        "result": RESULT,
        **options,
    }


def run_all(workers: list[Worker]) -> list[dict[str, Any]]:
    for worker in workers:
        worker.go()
    return [worker.outcome() for worker in workers]


def starts(log: Path) -> list[dict[str, Any]]:
    return [e for e in read_log(log) if e["event"] == "start"]


def test_the_work_runs_once_across_processes_and_every_process_gets_its_result(
    kind: str,
    spec: dict[str, Any],
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    record_figure: Callable[[str], None],
) -> None:
    """Processes call the once together (16 on the file backend, 4 on the servers'): one leads,
    the others wait and get its JSON result."""
    cfg = config(spec, tmp_path, sleep=0.5)
    outcomes = run_all(start_workers(16 if kind == "file" else 4, cfg))
    assert all(o.get("ok") == RESULT for o in outcomes), outcomes
    assert [o["ran"] for o in outcomes].count(True) == 1
    log = Path(cfg["log"])
    assert len(starts(log)) == 1
    # Latency: from the end of the leader's work to each follower having the result.
    end = next(e["t"] for e in read_log(log) if e["event"] == "end")
    latencies = [(o["t"] - end) * 1000 for o in outcomes if not o["ran"]]
    record_figure(
        f"{kind}: followers got the result {min(latencies):.1f} / "
        f"{statistics.median(latencies):.1f} / {max(latencies):.1f} ms (min/median/max) "
        "after the leader's work returned"
    )
    assert max(latencies) < 2000  # generous: the figure above is the measurement


@pytest.mark.kinds("file")
def test_the_file_backend_runs_once_across_trio_processes(
    kind: str, spec: dict[str, Any], tmp_path: Path, start_workers: Callable[..., list[Worker]]
) -> None:
    """FileLockBackend works the same on trio (and mixed with asyncio processes)."""
    cfg = config(spec, tmp_path, sleep=0.3)
    trio_workers = start_workers(2, {**cfg, "loop": "trio"})
    asyncio_worker = start_workers(1, cfg)
    outcomes = run_all([*trio_workers, *asyncio_worker])
    assert all(o.get("ok") == RESULT for o in outcomes), outcomes
    assert len(starts(Path(cfg["log"]))) == 1


# The file backend's case is tested against the in-memory store (test_lease.py) and the store
# contract (test_file_store.py); the real-process tests of the file backend are the 16-process
# run, the trio run and the leader killed among many followers.
@pytest.mark.kinds("redis", "postgres-xact")  # postgres: the 8-process takeover below
def test_a_killed_leader_is_replaced_by_a_follower(
    kind: str,
    spec: dict[str, Any],
    tmp_path: Path,
    start_workers: Callable[..., list[Worker]],
    record_figure: Callable[[str], None],
) -> None:
    """SIGKILL mid-work: the lock dies with the leader and a follower completes the work.

    File and PostgreSQL locks end with the process or its session, so the takeover is prompt;
    a Redis lock lives until its lease (1 s here) expires.
    """
    cfg = config(spec, tmp_path, first_sleep=60)
    workers = start_workers(3, cfg)
    for worker in workers:
        worker.go()
    log = Path(cfg["log"])
    wait_for(lambda: bool(starts(log)), what="the leader to start")
    leader_pid = starts(log)[0]["pid"]
    killed_at = time.time()
    os.kill(leader_pid, signal.SIGKILL)
    survivors = [w for w in workers if w.proc.pid != leader_pid]
    outcomes = [w.outcome() for w in survivors]
    assert all(o.get("ok") == RESULT for o in outcomes), outcomes
    runs = starts(log)
    assert len(runs) == 2
    takeover = runs[1]["t"] - killed_at
    record_figure(f"{kind}: a follower took over {takeover * 1000:.0f} ms after SIGKILL")
    assert takeover < (spec.get("lease", 0) + 2)


# The file backend's case is tested against the in-memory store (test_lease.py) and the store
# contract (test_file_store.py); the real-process tests of the file backend are the 16-process
# run, the trio run and the leader killed among many followers.
@pytest.mark.kinds("redis", "postgres")  # a reset does not depend on the lock mode
def test_a_reset_from_a_process_that_never_made_the_value_makes_the_next_call_run_it_again(
    kind: str, spec: dict[str, Any], tmp_path: Path, start_workers: Callable[..., list[Worker]]
) -> None:
    """An admin process calls ``await o.reset()`` without ever calling ``o``: the record is
    cleared, so the next call in a new process runs the work again."""
    cfg = config(spec, tmp_path)
    assert run_all(start_workers(1, cfg))[0]["ok"] == RESULT
    assert run_all(start_workers(1, {**cfg, "action": "reset"}))[0] == {
        "ok": "reset",
        "ran": False,
        "t": pytest.approx(time.time(), abs=60),
        "pid": pytest.approx(0, abs=1 << 31),
    }
    again = run_all(start_workers(1, cfg))[0]
    assert again["ok"] == RESULT
    assert again["ran"]
    assert len(starts(Path(cfg["log"]))) == 2


@pytest.mark.kinds("file", "postgres")
def test_when_the_leader_dies_among_many_followers_exactly_one_takes_over(
    kind: str, spec: dict[str, Any], tmp_path: Path, start_workers: Callable[..., list[Worker]]
) -> None:
    """Eight processes wake at once to no marker: they race, one leads, none goes round in
    circles (the suite's timeout would catch that), and all get the second leader's result."""
    cfg = config(spec, tmp_path, first_sleep=60)
    workers = start_workers(8, cfg)
    for worker in workers:
        worker.go()
    log = Path(cfg["log"])
    wait_for(lambda: bool(starts(log)), what="the leader to start")
    time.sleep(0.3)  # every follower is waiting
    leader_pid = starts(log)[0]["pid"]
    os.kill(leader_pid, signal.SIGKILL)
    outcomes = [w.outcome() for w in workers if w.proc.pid != leader_pid]
    assert [o.get("ok") for o in outcomes] == [RESULT] * 7, outcomes
    assert len(starts(log)) == 2
