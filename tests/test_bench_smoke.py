"""The benchmark suite runs end to end in its tiny configuration (no timing is checked)."""

from __future__ import annotations

import importlib.util
import json
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


@pytest.fixture
def bench_packages() -> None:
    """Skip unless the packages of the bench group are installed."""
    missing = [name for name in BENCH_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the bench needs {', '.join(missing)}: pip install -e . --group bench")


@pytest.mark.usefixtures("bench_packages")
def test_smoke_run_writes_every_scenario_and_contender(tmp_path: Path) -> None:
    """``python -m bench --smoke`` completes and writes well-formed results for everything."""
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        timeout=50,
        capture_output=True,
        text=True,
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
