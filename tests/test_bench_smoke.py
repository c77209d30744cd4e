"""The benchmark suite runs end to end in its tiny configuration (no timing is checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BENCH_PACKAGES = ("async_lru", "fastapi_singleton", "matplotlib", "uvicorn")

CONTENDERS = {
    "hot_path": {
        "nothing",
        "baseline",
        "baseline_again",
        "lru_cache",
        "lifespan_state",
        "fastapi_singleton",
        "alru_cache",
        "once",
        "once_subdep",
    },
    "cold_burst": {"event", "lock_recipe", "fastapi_singleton", "alru_cache", "once"},
    "failure_burst": {"lock_recipe", "fastapi_singleton", "alru_cache", "once"},
    "keyed": {"bare", "once_miss", "alru_miss", "once_hit", "alru_hit"},
    "real_http": {"baseline", "once"},
    "memory": {"once", "dict"},
}


def run_bench(
    args: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a bench command in a process group of its own; past ``timeout``, end the group
    (the bench's servers and apps too, which a timeout of the command alone would leave)."""
    with subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture
def bench_packages() -> None:
    """Skip unless the packages of the bench group are installed."""
    missing = [name for name in BENCH_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the bench needs {', '.join(missing)}: pip install -e . --group bench")


@pytest.mark.usefixtures("bench_packages")
def test_smoke_run_writes_every_scenario_and_contender(tmp_path: Path) -> None:
    """``python -m bench --smoke`` completes and writes well-formed results for everything."""
    run = run_bench(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == {*CONTENDERS, "import_time"}
    for name, expected in CONTENDERS.items():
        assert set(scenarios[name]["contenders"]) == expected, name
    for mode in ("idle", "busy"):
        for contender in scenarios["cold_burst"]["contenders"].values():
            assert set(contender[mode]) == {str(n) for n in scenarios["cold_burst"]["callers"]}
    assert scenarios["keyed"]["once_over_alru"].keys() == {"miss", "hit"}
    assert all(c["ns_per_call"] > 0 for c in scenarios["keyed"]["contenders"].values())
    assert scenarios["import_time"]["process_wall_s"].keys() == {"fastapi", "fastapi_once"}
    assert all({"target", "measured", "met"} <= t.keys() for t in results["targets"])
    assert (tmp_path / "results.md").read_text().startswith("# fastapi_once benchmarks")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_the_spread_of_two_rounds_stays_within_them() -> None:
    """Quartiles of two rounds (the smoke run's) lie between them: a ratio's spread drawn as an
    error bar never goes negative, which the plot refuses."""
    from bench.paired import ratios

    spread = ratios([0.2, 1.5], [1.0, 1.0])
    assert spread["min"] == spread["q1"] <= spread["median"] <= spread["q3"] == spread["max"]


FLEET_PACKAGES = ("uvicorn", "cashews", "aiocache")


@pytest.fixture
def fleet_packages() -> None:
    """Skip unless the peers that bench.fleet measures are installed."""
    missing = [name for name in FLEET_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"bench.fleet needs {', '.join(missing)}: pip install -e . --group bench")


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
def test_floors_smoke_run_measures_every_ratio_of_the_core(tmp_path: Path) -> None:
    """``python -m bench.floors --smoke`` writes each floor's ratio with its spread."""
    from bench.floors import ROWS  # needs the bench group's packages

    run = run_bench(
        [
            sys.executable,
            "-m",
            "bench.floors",
            "--smoke",
            "--processes",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr
    name = f"floors{sys.version_info[0]}{sys.version_info[1]}"
    results = json.loads((tmp_path / f"{name}.json").read_text())
    for key, *_ in ROWS:
        assert {"median", "q1", "q3", "min", "max"} <= results["ratios"][key].keys(), key
    # The hot path's rounds ran in two child processes (2 smoke rounds x 4 pairs each), pooled.
    assert len(results["ratios"]["hot_once_over_plain_per_process"]) == 2
    assert results["ratios"]["hot_rps"]["once"]["n"] == 2 * 2 * 4
    assert "load average" in (tmp_path / f"{name}.md").read_text()


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
