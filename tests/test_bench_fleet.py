"""The fleet and outage benchmarks run end to end at tiny sizes (no timing is checked).

Apart from tests/test_bench_smoke.py so that the two slowest bench runs are not all handed to
one test worker (pytest-xdist gives each worker whole files).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from bench_runs import BENCH_PACKAGES, ROOT, run_bench, skip_without


@pytest.fixture
def bench_packages() -> None:
    """Skip unless the packages of the bench group are installed."""
    skip_without(BENCH_PACKAGES, "the bench")


FLEET_PACKAGES = ("uvicorn", "cashews", "aiocache")


@pytest.fixture
def fleet_packages() -> None:
    """Skip unless the peers that bench.fleet measures are installed."""
    skip_without(FLEET_PACKAGES, "bench.fleet")


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("fleet_packages")
def test_fleet_smoke_run_fetches_each_url_once_per_worker_alone_and_once_across(
    tmp_path: Path,
) -> None:
    """``python -m bench.fleet`` at tiny sizes: a URL is fetched once a worker, or once across."""
    workers, requests, urls = 2, 20, 5
    run = run_bench(
        [
            *(sys.executable, "-m", "bench.fleet", "--workers", str(workers)),
            *("--requests", str(requests), "--urls", str(urls), "--rounds", "1"),
            *("--out", str(tmp_path)),
        ],
        cwd=ROOT,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "fleet.json").read_text())
    measured, refused = results["contenders"], results["not_available"]
    assert set(measured) | set(refused) == {
        "once",
        "once_redis",
        "once_postgres",
        "cashews",
        "aiocache",
        "aiocache_stampede",
    }
    # Each worker asks for every URL: without across=, each process fetches each URL once.
    alone = measured["once"]
    assert alone["fetches"] == workers * urls
    assert alone["runs"][0]["urls_fetched"] == urls
    assert alone["most_fetches_of_a_url"] == workers
    assert alone["most_values_of_a_url"] == workers
    assert alone["errors"] == 0
    missing = results["servers_missing"]
    for contender, server in (("once_redis", "redis"), ("once_postgres", "postgres")):
        if server in missing:
            continue
        assert contender in measured, refused[contender]["why"]
        # Across every worker: one fetch per URL, and every request served that one value.
        assert measured[contender]["fetches"] == urls, contender
        assert measured[contender]["most_values_of_a_url"] == 1, contender
        assert measured[contender]["errors"] == 0, contender
    for c in measured.values():
        assert c["runs"][0]["urls_fetched"] == urls, c["label"]
    assert (tmp_path / "fleet.md").read_text().count("\n| ") == len(measured) + len(refused) + 1
    if missing:
        message = "; ".join(f"{server}: {why}" for server, why in missing.items())
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"bench.fleet ran without a server: {message}", pytrace=False)
        pytest.skip(f"bench.fleet ran without a server: {message}")


@pytest.mark.usefixtures("bench_packages")
@pytest.mark.timeout(40)
def test_outage_bench_reports_both_policies_in_each_mode(tmp_path: Path) -> None:
    """``python -m bench.outage``, tiny, reports "raise" and "local" through a stall and a
    restart of Redis: requests sent and failed in the window and overall, and upstream fetches."""
    if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
        pytest.skip("the outage bench needs redis-server and the redis package")
    run = run_bench(
        [
            *(sys.executable, "-m", "bench.outage", "--out", str(tmp_path)),
            *("--workers", "1", "--seconds", "1", "--outage", "0.4", "--rate", "20"),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=35,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "outage.json").read_text())
    assert set(results["modes"]) == {"stall", "restart"}
    for measured in results["modes"].values():
        assert set(measured["contenders"]) == {"raise", "local"}
        for contender in measured["contenders"].values():
            assert contender["overall"]["sent"] > 0
            assert {"sent", "failed", "failed_by_status", "p50_ms", "p99_ms"} <= set(
                contender["window"]
            )
            assert contender["upstream_fetches"] > 0
    table = (tmp_path / "outage.md").read_text()
    assert '`"raise"`' in table
    assert '`"local"`' in table
