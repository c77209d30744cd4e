"""The benchmark suite runs end to end in its tiny configuration (no timing is checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from bench_runs import BENCH_PACKAGES, ROOT, run_bench, skip_without

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


@pytest.fixture
def bench_packages() -> None:
    """Skip unless the packages of the bench group are installed."""
    skip_without(BENCH_PACKAGES, "the bench")


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
