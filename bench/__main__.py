"""``python -m bench``: run every scenario, print the table, write results.json, .md and .png."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import burst, hot_path, import_time, keyed, memory, real_http, report
from .config import FULL, SMOKE, Config

SCENARIOS = (
    "hot_path",
    "cold_burst",
    "failure_burst",
    "keyed",
    "real_http",
    "memory",
    "import_time",
)


def _runners(config: Config, loadgen: str) -> dict[str, Callable[[], dict[str, Any]]]:
    return {
        "hot_path": lambda: asyncio.run(hot_path.run(config)),
        "cold_burst": lambda: burst.run_cold(config),
        "failure_burst": lambda: burst.run_failure(config),
        "keyed": lambda: keyed.run(config),
        "real_http": lambda: real_http.run(config, loadgen),
        "memory": lambda: memory.run(config),
        "import_time": lambda: import_time.run(config),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the bench; return the process exit status (0 even when a target is missed)."""
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark fastapi_once against its peers."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that it runs, numbers meaningless"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="where to write results.json, results.md and bench.png (default: bench/results/)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable)",
    )
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default=None,
        help="load generator for real HTTP: wrk if installed (auto), or the bench's own "
        "(python); --smoke uses python",
    )
    args = parser.parse_args(args_list)
    config = SMOKE if args.smoke else FULL
    loadgen = args.loadgen or ("python" if args.smoke else "auto")
    runners = _runners(config, loadgen)
    # Taken first: the commit and package files the scenarios then load.
    environment = report.environment(args_list)
    scenarios: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.only or SCENARIOS:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        scenarios[name] = runners[name]()
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results: dict[str, Any] = {
        "environment": environment,
        "config": config.as_dict(),
        "seconds": time.perf_counter() - started,
        "scenarios": scenarios,
    }
    results["targets"] = report.targets(scenarios)
    args.out.mkdir(parents=True, exist_ok=True)
    table = report.markdown(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(table + "\n")
    report.plot(results, args.out / "bench.png")
    print(table)
    print(f"[bench] wrote {args.out}/results.json, results.md, bench.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
